//! Text the CRDs let through to the operator and broker: durations (`15m`, `1h30m`) and
//! time windows (zone, `HH:MM`), which the broker evaluates on every request.
#![no_main]

use cloudpass_api::{duration::Duration, policy::TimeWindow};
use cloudpass_broker::conditions::in_window;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = text.parse::<Duration>();
    let mut parts = text.splitn(3, '|');
    let window = TimeWindow {
        time_zone: parts.next().unwrap_or_default().into(),
        days: vec![],
        start: parts.next().unwrap_or_default().into(),
        end: parts.next().unwrap_or_default().into(),
    };
    let _ = in_window(&window, jiff::Timestamp::UNIX_EPOCH);
    let _ = in_window(&window, jiff::Timestamp::MAX);
});
