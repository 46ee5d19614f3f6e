# Runs an app program of the scenarios again and again, as a long-running workload does:
#   python3 every.py <seconds> <program.py>
# Each run is the program's own (a new SDK session each time, so the SDK asks the agent
# for credentials every run) and prints its own JSON line. A Python PID 1 ignores SIGTERM
# unless it handles it; this exits at once, so a pod stops without its grace period.
import runpy, signal, sys, time


class Stop(BaseException):
    pass


def stop(*_):
    raise Stop()


signal.signal(signal.SIGTERM, stop)
interval, program = float(sys.argv[1]), sys.argv[2]
try:
    while True:
        try:
            runpy.run_path(program, run_name="__main__")
        except SystemExit:
            pass
        sys.stdout.flush()
        time.sleep(interval)
except Stop:
    sys.exit(0)
