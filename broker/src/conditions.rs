//! The conditions of an AccessPolicy checked on every request: time windows.

use cloudpass_api::policy::{AccessConditions, TimeWindow, Weekday};

/// Minutes since midnight of `HH:MM` (`24:00` included); `None` for anything else. The
/// CRD enforces the form, but the broker reads it from a ConfigMap and checks again.
fn minutes(hh_mm: &str) -> Option<i32> {
    let (h, m) = hh_mm.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m) = (h.parse::<i32>().ok()?, m.parse::<i32>().ok()?);
    ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
}

fn weekday(day: jiff::civil::Weekday) -> Weekday {
    use jiff::civil::Weekday as J;
    match day {
        J::Monday => Weekday::Monday,
        J::Tuesday => Weekday::Tuesday,
        J::Wednesday => Weekday::Wednesday,
        J::Thursday => Weekday::Thursday,
        J::Friday => Weekday::Friday,
        J::Saturday => Weekday::Saturday,
        J::Sunday => Weekday::Sunday,
    }
}

/// Whether `now` falls inside `window` (in the window's time zone). A window whose end is
/// not after its start crosses midnight, and its `days` name the day it opens.
pub fn in_window(window: &TimeWindow, now: jiff::Timestamp) -> Result<bool, String> {
    let tz = jiff::tz::TimeZone::get(&window.time_zone)
        .map_err(|_| format!("time zone {:?} is unknown", window.time_zone))?;
    let (start, end) = match (minutes(&window.start), minutes(&window.end)) {
        (Some(s), Some(e)) if s != e => (s, e),
        _ => return Err(format!("window {}-{} is malformed", window.start, window.end)),
    };
    let local = now.to_zoned(tz);
    let opens_on = |day: jiff::civil::Weekday| window.days.is_empty() || window.days.contains(&weekday(day));
    let at = i32::from(local.hour()) * 60 + i32::from(local.minute());
    Ok(if start < end {
        opens_on(local.weekday()) && start <= at && at < end
    } else {
        // Before midnight it is the window opened today; after, the one opened yesterday.
        (opens_on(local.weekday()) && start <= at) || (opens_on(local.weekday().previous()) && at < end)
    })
}

/// When the occurrence of `window` that contains `now` closes; `None` when `now` is
/// outside it (or the window is malformed). A closing time that does not exist on that
/// day (in a daylight-saving gap) closes it when the clocks jump past it, as
/// [`in_window`] sees it.
pub fn window_end(window: &TimeWindow, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
    if !in_window(window, now).ok()? {
        return None;
    }
    let tz = jiff::tz::TimeZone::get(&window.time_zone).ok()?;
    let (start, end) = (minutes(&window.start)?, minutes(&window.end)?);
    let local = now.to_zoned(tz.clone());
    let at = i32::from(local.hour()) * 60 + i32::from(local.minute());
    // The civil day on which it closes: today, unless it crosses midnight and opened today.
    let mut day = local.date();
    if start > end && at >= start {
        day = day.tomorrow().ok()?;
    }
    let (day, end) = if end == 24 * 60 { (day.tomorrow().ok()?, 0) } else { (day, end) };
    let closes = tz.to_ambiguous_timestamp(day.at((end / 60) as i8, (end % 60) as i8, 0, 0));
    match closes.offset() {
        jiff::tz::AmbiguousOffset::Gap { .. } => Some(tz.following(closes.earlier().ok()?).next()?.timestamp()),
        // Repeated (a fold): the first time the clocks show it.
        _ => closes.compatible().ok(),
    }
}

/// When access under `conditions` ends at the latest, given that it is allowed at `now`:
/// the latest close of the time windows open at `now`; `None` without time windows.
pub fn access_ends(conditions: Option<&AccessConditions>, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
    conditions?.time_windows.iter().filter_map(|w| window_end(w, now)).max()
}

/// `Ok` when every condition holds at `now`, else why not.
pub fn check(conditions: Option<&AccessConditions>, now: jiff::Timestamp) -> Result<(), String> {
    let Some(windows) = conditions.map(|c| &c.time_windows).filter(|w| !w.is_empty()) else { return Ok(()) };
    for window in windows {
        if in_window(window, now)? {
            return Ok(());
        }
    }
    let list: Vec<String> = windows
        .iter()
        .map(|w| {
            let days = if w.days.is_empty() { "every day".to_owned() } else { format!("{:?}", w.days) };
            format!("{}-{} {} ({days})", w.start, w.end, w.time_zone)
        })
        .collect();
    Err(format!("outside the policy's time windows: {}", list.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(tz: &str, days: &[Weekday], start: &str, end: &str) -> TimeWindow {
        TimeWindow { time_zone: tz.into(), days: days.to_vec(), start: start.into(), end: end.into() }
    }

    #[test]
    fn windows_respect_zone_day_and_bounds() {
        // 2026-11-23 is a Monday; 08:30 UTC is 09:30 in Berlin (CET).
        let t: jiff::Timestamp = "2026-11-23T08:30:00Z".parse().unwrap();
        assert!(in_window(&window("Europe/Berlin", &[Weekday::Monday], "09:00", "17:00"), t).unwrap());
        assert!(!in_window(&window("UTC", &[], "09:00", "17:00"), t).unwrap());
        assert!(!in_window(&window("Europe/Berlin", &[Weekday::Tuesday], "09:00", "17:00"), t).unwrap());
        assert!(in_window(&window("UTC", &[], "08:30", "08:31"), t).unwrap(), "start is inclusive");
        assert!(!in_window(&window("UTC", &[], "08:00", "08:30"), t).unwrap(), "end is exclusive");
        assert!(in_window(&window("UTC", &[], "00:00", "24:00"), t).unwrap());
        assert!(in_window(&window("Mars/Olympus", &[], "00:00", "24:00"), t).is_err());
        let conditions = AccessConditions {
            time_windows: vec![
                window("UTC", &[], "22:00", "23:00"),
                window("UTC", &[Weekday::Monday], "08:00", "09:00"),
            ],
            max_credential_lifetime: None,
        };
        assert!(check(Some(&conditions), t).is_ok(), "any window suffices");
        let closed = AccessConditions { time_windows: vec![window("UTC", &[], "22:00", "23:00")], ..conditions };
        let err = check(Some(&closed), t).unwrap_err();
        assert!(err.contains("outside the policy's time windows: 22:00-23:00 UTC"), "{err}");
        assert!(check(None, t).is_ok());
    }

    #[test]
    fn a_window_whose_end_is_not_after_its_start_crosses_midnight() {
        let night = |days: &[Weekday]| window("UTC", days, "22:00", "06:00");
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        // 2026-11-22 is a Sunday, 2026-11-23 a Monday.
        assert!(in_window(&night(&[]), at("2026-11-22T23:30:00Z")).unwrap());
        assert!(in_window(&night(&[]), at("2026-11-23T05:59:00Z")).unwrap());
        assert!(!in_window(&night(&[]), at("2026-11-23T06:00:00Z")).unwrap(), "end is exclusive");
        assert!(!in_window(&night(&[]), at("2026-11-23T12:00:00Z")).unwrap());
        assert!(in_window(&night(&[]), at("2026-11-23T22:00:00Z")).unwrap(), "start is inclusive");
        // `days` names the day the window opens: Sunday night runs into Monday morning.
        assert!(in_window(&night(&[Weekday::Sunday]), at("2026-11-23T03:00:00Z")).unwrap());
        assert!(!in_window(&night(&[Weekday::Sunday]), at("2026-11-23T23:00:00Z")).unwrap());
        assert!(!in_window(&night(&[Weekday::Monday]), at("2026-11-23T03:00:00Z")).unwrap());
        assert!(in_window(&night(&[Weekday::Monday]), at("2026-11-23T23:00:00Z")).unwrap());
        // Ending at 00:00 is ending at midnight.
        assert!(in_window(&window("UTC", &[], "23:00", "00:00"), at("2026-11-23T23:59:00Z")).unwrap());
        assert!(!in_window(&window("UTC", &[], "23:00", "00:00"), at("2026-11-23T00:30:00Z")).unwrap());
        assert!(in_window(&window("UTC", &[], "10:00", "10:00"), at("2026-11-23T10:00:00Z")).is_err());
    }

    #[test]
    fn a_window_closes_at_its_end_in_its_zone() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let end = |w: &TimeWindow, now: &str| window_end(w, at(now)).map(|t| t.to_string());
        // 2026-11-23 is a Monday; Berlin is UTC+1 then.
        let office = window("Europe/Berlin", &[Weekday::Monday], "09:00", "17:00");
        assert_eq!(end(&office, "2026-11-23T15:59:30Z").as_deref(), Some("2026-11-23T16:00:00Z"));
        assert_eq!(end(&office, "2026-11-23T16:00:00Z"), None, "closed");
        assert_eq!(end(&office, "2026-11-24T10:00:00Z"), None, "not on Tuesday");
        let night = window("UTC", &[], "22:00", "06:00");
        assert_eq!(end(&night, "2026-11-22T23:30:00Z").as_deref(), Some("2026-11-23T06:00:00Z"));
        assert_eq!(end(&night, "2026-11-23T05:59:59Z").as_deref(), Some("2026-11-23T06:00:00Z"));
        let to_midnight = window("UTC", &[], "20:00", "24:00");
        assert_eq!(end(&to_midnight, "2026-11-23T23:59:00Z").as_deref(), Some("2026-11-24T00:00:00Z"));
        let all_day = window("UTC", &[], "00:00", "24:00");
        assert_eq!(end(&all_day, "2026-11-23T00:00:00Z").as_deref(), Some("2026-11-24T00:00:00Z"));
        // 2026-03-29: Berlin skips 02:00-03:00 CET; a window ending at 02:30 closes when the
        // clocks jump, at 01:00 UTC.
        let gap = window("Europe/Berlin", &[], "01:00", "02:30");
        assert_eq!(end(&gap, "2026-03-29T00:30:00Z").as_deref(), Some("2026-03-29T01:00:00Z"));

        // Overlapping windows: the latest close of those open now.
        let conditions = AccessConditions {
            time_windows: vec![
                window("UTC", &[], "08:00", "09:00"),
                window("UTC", &[], "08:30", "12:00"),
                window("UTC", &[], "13:00", "14:00"),
            ],
            max_credential_lifetime: None,
        };
        let ends = |now: &str| access_ends(Some(&conditions), at(now)).map(|t| t.to_string());
        assert_eq!(ends("2026-11-23T08:10:00Z").as_deref(), Some("2026-11-23T09:00:00Z"));
        assert_eq!(ends("2026-11-23T08:40:00Z").as_deref(), Some("2026-11-23T12:00:00Z"));
        assert_eq!(ends("2026-11-23T12:30:00Z"), None);
        assert_eq!(access_ends(None, at("2026-11-23T08:10:00Z")), None);
    }

    #[test]
    fn malformed_times_are_refused_not_misread() {
        let t: jiff::Timestamp = "2026-11-23T08:30:00Z".parse().unwrap();
        // The first found by fuzz/durations_and_windows: an hour that overflowed.
        for (start, end) in
            [("02544025444:01", "06:00"), ("9:00", "17:00"), ("25:00", "26:00"), ("08:60", "09:00"), ("+8:00", "09:00")]
        {
            let e = in_window(&window("UTC", &[], start, end), t).unwrap_err();
            assert!(e.contains("is malformed"), "{start}-{end}: {e}");
        }
        assert!(in_window(&window("UTC", &[], "00:00", "24:00"), t).unwrap());
    }
}
