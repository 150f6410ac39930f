//! Value-level helpers: dummy values per VR, date shifting, and scrubbing known identifiers out of
//! free text.

use dicom_core::{PrimitiveValue, VR};

/// A dummy value consistent with `vr`, for the D action on attributes that carry no pseudonym.
pub fn dummy(vr: VR) -> PrimitiveValue {
    match vr {
        VR::DA => PrimitiveValue::from("19000101"),
        VR::TM => PrimitiveValue::from("000000"),
        VR::DT => PrimitiveValue::from("19000101000000"),
        VR::AS => PrimitiveValue::from("000Y"),
        VR::DS | VR::IS => PrimitiveValue::from("0"),
        VR::CS => PrimitiveValue::from("REMOVED"),
        VR::UR => PrimitiveValue::from("urn:removed"),
        VR::US => PrimitiveValue::from(0_u16),
        VR::SS => PrimitiveValue::from(0_i16),
        VR::UL => PrimitiveValue::from(0_u32),
        VR::SL => PrimitiveValue::from(0_i32),
        VR::FL => PrimitiveValue::from(0_f32),
        VR::FD => PrimitiveValue::from(0_f64),
        VR::UV => PrimitiveValue::from(0_u64),
        VR::SV => PrimitiveValue::from(0_i64),
        VR::AT => PrimitiveValue::Tags(vec![dicom_core::Tag(0, 0)].into()),
        VR::OB | VR::OW | VR::OD | VR::OF | VR::OL | VR::OV | VR::UN => {
            PrimitiveValue::from(vec![0_u8, 0_u8])
        }
        _ => PrimitiveValue::from("REMOVED"),
    }
}

/// True for VRs whose value is character text a person could have typed a name into.
pub fn is_text(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::CS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::ST
            | VR::UC
            | VR::UR
            | VR::UT
            | VR::DA
            | VR::DT
            | VR::TM
    )
}

/// True for free-text VRs (no fixed format): where names, IDs and addresses hide.
pub fn is_free_text(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE | VR::LO | VR::LT | VR::PN | VR::SH | VR::ST | VR::UC | VR::UR | VR::UT
    )
}

/// Shifts a DICOM DA value (YYYYMMDD) by `days`; `None` when it is not a full, valid date.
pub fn shift_date(da: &str, days: i64) -> Option<String> {
    let da = da.trim();
    if da.is_empty() {
        return Some(String::new());
    }
    if da.len() != 8 || !da.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i32 = da[..4].parse().ok()?;
    let m: u8 = da[4..6].parse().ok()?;
    let d: u8 = da[6..8].parse().ok()?;
    let date = time::Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()?;
    let shifted = date.checked_add(time::Duration::days(days))?;
    if shifted.year() < 1 || shifted.year() > 9999 {
        return None;
    }
    Some(format!(
        "{:04}{:02}{:02}",
        shifted.year(),
        u8::from(shifted.month()),
        shifted.day()
    ))
}

/// Shifts the date part of a DT value (YYYYMMDD[HHMMSS[.F]][&ZZXX]); the time of day and the
/// offset from UTC are kept. `None` when the value has no full date.
pub fn shift_datetime(dt: &str, days: i64) -> Option<String> {
    let dt = dt.trim();
    if dt.is_empty() {
        return Some(String::new());
    }
    if dt.len() < 8 || !dt.is_char_boundary(8) {
        return None;
    }
    let rest = &dt[8..];
    if !rest
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'+' || b == b'-')
    {
        return None;
    }
    Some(format!("{}{}", shift_date(&dt[..8], days)?, rest))
}

/// Shifts every value of a multi-valued DA or DT (also `a-b` ranges); `None` if any is not a date.
pub fn shift_values(values: &[String], vr: VR, days: i64) -> Option<Vec<String>> {
    values
        .iter()
        .map(|v| {
            let one = |s: &str| {
                if vr == VR::DT {
                    shift_datetime(s, days)
                } else {
                    shift_date(s, days)
                }
            };
            match v.trim().split_once('-') {
                Some((a, b)) if vr == VR::DA => Some(format!("{}-{}", one(a)?, one(b)?)),
                _ => one(v),
            }
        })
        .collect()
}

/// Lower-cases ASCII and keeps other characters, so comparisons are case-insensitive.
pub fn fold(s: &str) -> String {
    s.to_ascii_lowercase()
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// Byte ranges where `term` (already folded) occurs in `folded` as a whole word.
pub fn word_matches(folded: &str, term: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    if term.is_empty() {
        return out;
    }
    let mut from = 0;
    while let Some(i) = folded[from..].find(term) {
        let start = from + i;
        let end = start + term.len();
        let before_ok = folded[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word(c));
        let after_ok = folded[end..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            out.push((start, end));
        }
        from = start + term.chars().next().map_or(1, char::len_utf8);
    }
    out
}

/// Replaces every whole-word occurrence of each term with `*` of the same length, so the value
/// never grows past its VR's limit. Returns the cleaned text and whether anything changed.
pub fn scrub(text: &str, terms: &[String]) -> (String, bool) {
    let folded = fold(text);
    let mut bytes: Vec<u8> = text.as_bytes().to_vec();
    let mut changed = false;
    for term in terms {
        for (s, e) in word_matches(&folded, term) {
            for b in &mut bytes[s..e] {
                *b = b'*';
            }
            changed = true;
        }
    }
    (String::from_utf8_lossy(&bytes).into_owned(), changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_shift_keeps_intervals() {
        assert_eq!(shift_date("20240301", -1).as_deref(), Some("20240229"));
        assert_eq!(shift_date("2024", -1), None);
        assert_eq!(shift_date("20241301", -1), None);
        assert_eq!(shift_date("", -5).as_deref(), Some(""));
        assert_eq!(
            shift_datetime("20240301120000.5+0100", -1).as_deref(),
            Some("20240229120000.5+0100")
        );
        let v = shift_values(&["20240110-20240120".into()], VR::DA, -10).unwrap();
        assert_eq!(v, vec!["20231231-20240110".to_string()]);
    }

    #[test]
    fn scrub_is_whole_word_and_case_insensitive() {
        let terms = vec!["smith".to_string(), "ann".to_string()];
        let (s, changed) = scrub("CT head for SMITH, Ann (Annotation)", &terms);
        assert!(changed);
        assert_eq!(s, "CT head for *****, *** (Annotation)");
        assert_eq!(
            scrub("nothing here", &terms),
            ("nothing here".to_string(), false)
        );
    }
}
