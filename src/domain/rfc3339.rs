//! RFC 3339 timestamps written the way chrono's `Serialize` writes a `DateTime<Utc>`
//! (`2026-12-03T08:53:46.123Z`: seconds always, the fraction in 3, 6 or 9 digits only when
//! not zero, `Z`), but into a stack buffer instead of through `core::fmt`: every stored
//! message carries one or two, and chrono's formatting was about 2,400 instructions each.
//! Years outside 0000–9999 (which chrono writes with a sign) are left to chrono.

use chrono::{DateTime, Datelike as _, Timelike as _, Utc};
use serde::{Serialize as _, Serializer};

/// The longest timestamp written here: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 30;

/// For `#[serde(serialize_with = "rfc3339::serialize")]` on a `DateTime<Utc>`: the same string
/// as chrono's own `Serialize`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buffer = [0u8; MAX_LEN];
    match write(at, &mut buffer) {
        Some(len) => {
            let text = std::str::from_utf8(&buffer[..len]).expect("only ASCII digits and signs");
            serializer.serialize_str(text)
        }
        None => at.serialize(serializer),
    }
}

/// [`serialize`] for an optional timestamp (`None` is `null`, as serde writes it).
pub fn serialize_option<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serialize(at, serializer),
        None => serializer.serialize_none(),
    }
}

/// Writes `at` into `buffer` and returns its length, or `None` for a year chrono writes with
/// a sign.
fn write(at: &DateTime<Utc>, buffer: &mut [u8; MAX_LEN]) -> Option<usize> {
    // The fields of a `DateTime` each add its offset again; the naive time is UTC already.
    let at = at.naive_utc();
    let year = u32::try_from(at.year()).ok().filter(|&y| y <= 9999)?;
    let mut second = at.second();
    let mut nano = at.nanosecond();
    // A leap second is kept as nanoseconds past 1e9; chrono writes it as second 60.
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    let mut out = Out { buffer, len: 0 };
    out.digits(year, 4);
    out.byte(b'-');
    out.digits(at.month(), 2);
    out.byte(b'-');
    out.digits(at.day(), 2);
    out.byte(b'T');
    out.digits(at.hour(), 2);
    out.byte(b':');
    out.digits(at.minute(), 2);
    out.byte(b':');
    out.digits(second, 2);
    let fraction = if nano == 0 {
        None
    } else if nano % 1_000_000 == 0 {
        Some((nano / 1_000_000, 3))
    } else if nano % 1_000 == 0 {
        Some((nano / 1_000, 6))
    } else {
        Some((nano, 9))
    };
    if let Some((value, width)) = fraction {
        out.byte(b'.');
        out.digits(value, width);
    }
    out.byte(b'Z');
    Some(out.len)
}

/// A cursor over the buffer being written.
struct Out<'a> {
    buffer: &'a mut [u8; MAX_LEN],
    len: usize,
}

impl Out<'_> {
    fn byte(&mut self, byte: u8) {
        self.buffer[self.len] = byte;
        self.len += 1;
    }

    /// `value` in decimal, zero-padded to `width` digits.
    fn digits(&mut self, mut value: u32, width: usize) {
        for i in (0..width).rev() {
            self.buffer[self.len + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone as _};
    use proptest::prelude::*;

    #[derive(serde::Serialize)]
    struct Ours(#[serde(serialize_with = "serialize")] DateTime<Utc>);

    fn assert_as_chrono(at: DateTime<Utc>) {
        assert_eq!(
            serde_json::to_string(&Ours(at)).unwrap(),
            serde_json::to_string(&at).unwrap(),
            "{at:?}"
        );
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let base = Utc.with_ymd_and_hms(2026, 12, 3, 8, 53, 46).unwrap();
        for nanos in [
            0,
            1,
            999,
            1_000,
            123_000,
            1_000_000,
            120_000_000,
            999_999_999,
        ] {
            assert_as_chrono(base + chrono::Duration::nanoseconds(nanos));
        }
        for (y, m, d) in [
            (0, 1, 1),
            (1, 1, 1),
            (999, 12, 31),
            (1970, 1, 1),
            (9999, 12, 31),
        ] {
            let day = NaiveDate::from_ymd_opt(y, m, d).unwrap();
            assert_as_chrono(day.and_hms_nano_opt(23, 59, 59, 5_000).unwrap().and_utc());
        }
    }

    #[test]
    fn a_leap_second_and_years_out_of_range_are_written_as_chrono_writes_them() {
        let day = NaiveDate::from_ymd_opt(2016, 12, 31).unwrap();
        assert_as_chrono(
            day.and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc(),
        );
        for y in [-1, -2026, 10_000, 200_000] {
            let day = NaiveDate::from_ymd_opt(y, 6, 15).unwrap();
            assert_as_chrono(day.and_hms_opt(12, 0, 0).unwrap().and_utc());
        }
    }

    #[test]
    fn none_is_null() {
        #[derive(serde::Serialize)]
        struct Maybe(#[serde(serialize_with = "serialize_option")] Option<DateTime<Utc>>);
        assert_eq!(serde_json::to_string(&Maybe(None)).unwrap(), "null");
        let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(
            serde_json::to_string(&Maybe(Some(at))).unwrap(),
            serde_json::to_string(&at).unwrap()
        );
    }

    proptest! {
        #[test]
        fn any_timestamp_is_written_as_chrono_writes_it(
            secs in -70_000_000_000i64..300_000_000_000,
            nanos in 0u32..1_000_000_000,
            round in 0usize..3,
        ) {
            // Rounded to whole milli- and microseconds as well, to reach the shorter fractions.
            let nanos = match round { 0 => nanos, 1 => nanos / 1_000 * 1_000, _ => nanos / 1_000_000 * 1_000_000 };
            let at = DateTime::from_timestamp(secs, nanos).unwrap();
            prop_assert_eq!(
                serde_json::to_string(&Ours(at)).unwrap(),
                serde_json::to_string(&at).unwrap()
            );
        }
    }
}
