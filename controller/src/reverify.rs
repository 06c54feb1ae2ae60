//! When a workload whose role STS confirmed is asked about again. A certificate cannot be
//! revoked, so without this a role that stops trusting its ServiceAccount would keep its
//! certificate, and get a new one, until the next renewal.

use std::time::Duration;

use rolemesh_profile::parse_duration;
use time::OffsetDateTime;

/// `reverifyInterval` when the MTLSAuthority does not set it.
pub const DEFAULT_REVERIFY_INTERVAL: Duration = Duration::from_secs(3600);
/// Below this, every workload costs a TokenRequest and an STS call more often than STS's
/// throttle comfortably allows for a few hundred workloads.
pub const MIN_REVERIFY_INTERVAL: Duration = Duration::from_secs(60);
/// The longest a removed trust may go unnoticed.
pub const MAX_REVERIFY_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Share of the interval by which a workload's due time moves, so that workloads verified
/// together (a controller start) are not asked about together again.
const JITTER_FRACTION: f64 = 0.1;

/// The interval an MTLSAuthority's `reverifyInterval` names, or why it is not one.
pub fn reverify_interval(value: Option<&str>) -> Result<Duration, String> {
    let Some(text) = value else {
        return Ok(DEFAULT_REVERIFY_INTERVAL);
    };
    let interval = parse_duration(text).map_err(|e| format!("reverifyInterval: {e}"))?;
    if !(MIN_REVERIFY_INTERVAL..=MAX_REVERIFY_INTERVAL).contains(&interval) {
        return Err(format!(
            "reverifyInterval {text} is out of range: set it between 1m and 24h (default 1h)"
        ));
    }
    Ok(interval)
}

/// When the role of the certificate with `serial`, last confirmed by STS at `verified_at`, is
/// verified again: `interval` later, moved by up to ±10% by the serial, so that the time is the
/// same in every reconcile (and every replica) but differs between certificates.
pub fn reverify_due(
    verified_at: OffsetDateTime,
    interval: Duration,
    serial: &[u8],
) -> OffsetDateTime {
    // The serial is random (issuance draws it), so its first bytes are a uniform spread.
    let mut first = [0u8; 8];
    for (slot, byte) in first.iter_mut().zip(serial.iter()) {
        *slot = *byte;
    }
    let unit = u64::from_be_bytes(first) as f64 / u64::MAX as f64;
    let factor = 1.0 + JITTER_FRACTION * (2.0 * unit - 1.0);
    let wait =
        time::Duration::try_from(interval.mul_f64(factor)).unwrap_or(time::Duration::hours(1));
    verified_at + wait
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_defaults_and_bounds() {
        assert_eq!(reverify_interval(None), Ok(DEFAULT_REVERIFY_INTERVAL));
        assert_eq!(reverify_interval(Some("1m")), Ok(Duration::from_secs(60)));
        assert_eq!(
            reverify_interval(Some("24h")),
            Ok(Duration::from_secs(86400))
        );
        for bad in ["59s", "25h", "0s", "1x", ""] {
            let error = reverify_interval(Some(bad)).expect_err(bad);
            assert!(error.contains("reverifyInterval"), "{bad}: {error}");
        }
        let error = reverify_interval(Some("48h")).expect_err("48h");
        assert!(error.contains("between 1m and 24h"), "{error}");
    }

    #[test]
    fn due_time_stays_within_ten_percent_and_is_stable() {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let interval = Duration::from_secs(3600);
        let serials: [&[u8]; 5] = [
            &[0; 16],
            &[0xff; 16],
            &[0x80, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0x12, 0x34],
            &[],
        ];
        for serial in serials {
            let due = reverify_due(at, interval, serial);
            let wait = (due - at).whole_seconds();
            assert!((3240..=3960).contains(&wait), "{serial:?}: {wait}s");
            assert_eq!(due, reverify_due(at, interval, serial));
        }
        // The extremes of the serial reach the extremes of the spread.
        assert_eq!(
            (reverify_due(at, interval, &[0; 16]) - at).whole_seconds(),
            3240
        );
        assert_eq!(
            (reverify_due(at, interval, &[0xff; 16]) - at).whole_seconds(),
            3960
        );
        assert_ne!(
            reverify_due(at, interval, &[0x10; 8]),
            reverify_due(at, interval, &[0x90; 8])
        );
    }
}
