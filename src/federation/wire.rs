//! Strings a peer sends: checked for length and character set before anything logs, audits or
//! uses them, and the bounded form in which a refused one may be shown.
//!
//! Owns: the form of every peer-supplied identifier of the protocol (agreement id, flow name,
//! purpose, study token, SOP Instance UID, transfer id) and [`shown`], the only way a peer string
//! reaches a log line or an audit entry. Does not own: whether the value is allowed (that is the
//! agreement, `dsa`).

/// Longest identifier accepted in an agreement id, flow name or purpose.
pub const MAX_NAME: usize = 64;
/// Longest UID (DICOM: 64 characters).
pub const MAX_UID: usize = 64;
/// A transfer id is 32 lowercase hex digits.
pub const TRANSFER_ID_LEN: usize = 32;

/// Why a peer string was refused. Never contains the string itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is not valid: {why}")]
pub struct BadField {
    pub field: &'static str,
    pub why: String,
}

fn bad(field: &'static str, why: impl Into<String>) -> BadField {
    BadField {
        field,
        why: why.into(),
    }
}

/// An agreement id, flow name or purpose: 1-64 of `[A-Za-z0-9._-]`, starting with a letter or
/// digit (so never `.` or `..`).
pub fn check_name(field: &'static str, s: &str) -> Result<(), BadField> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(bad(
            field,
            format!("{} bytes; 1-{MAX_NAME} are allowed", s.len()),
        ));
    }
    let ok_start = s.as_bytes()[0].is_ascii_alphanumeric();
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_start || !ok {
        return Err(bad(
            field,
            "use letters, digits, '.', '_' and '-', starting with a letter or digit",
        ));
    }
    Ok(())
}

/// A DICOM UID: 1-64 characters, digit components separated by single dots, no leading zero in
/// a component (PS3.5 9.1). Study tokens are the de-identified Study Instance UIDs, so they have
/// this form too (and `.` or `..` never do).
pub fn check_uid(field: &'static str, s: &str) -> Result<(), BadField> {
    if s.is_empty() || s.len() > MAX_UID {
        return Err(bad(
            field,
            format!("{} bytes; a UID has 1-{MAX_UID}", s.len()),
        ));
    }
    for c in s.split('.') {
        let digits = !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit());
        if !digits || (c.len() > 1 && c.starts_with('0')) {
            return Err(bad(
                field,
                "not a UID (digit components separated by dots, no leading zeros)",
            ));
        }
    }
    Ok(())
}

/// A transfer id as the receiver hands them out.
pub fn check_transfer_id(s: &str) -> Result<(), BadField> {
    if s.len() != TRANSFER_ID_LEN || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad("transfer id", "not a transfer id this node issued"));
    }
    Ok(())
}

/// How a peer string may appear in a log line or audit entry: itself when it is short and made
/// only of safe characters, otherwise a description of its size (never its content).
pub fn shown(s: &str) -> String {
    let safe = s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if safe {
        s.to_string()
    } else {
        format!("<{} bytes not shown>", s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_and_uids() {
        assert!(check_name("agreement id", "test-telerad").is_ok());
        assert!(check_name("agreement id", "").is_err());
        assert!(check_name("agreement id", ".").is_err());
        assert!(check_name("agreement id", "a b").is_err());
        assert!(check_name("agreement id", &"a".repeat(65)).is_err());
        assert!(check_uid("study token", "2.25.1234").is_ok());
        for bad in [".", "..", "2..5", "2.25.", "a.b", "2.05", "../x"] {
            assert!(check_uid("study token", bad).is_err(), "{bad}");
        }
        assert!(check_transfer_id(&"ab".repeat(16)).is_ok());
        assert!(check_transfer_id("../x").is_err());
    }

    proptest! {
        #[test]
        fn shown_is_bounded_and_safe(s in ".{0,300}") {
            let out = shown(&s);
            prop_assert!(out.len() <= 64 + 30);
            prop_assert!(out.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
            prop_assert!(!out.contains('\n'));
        }
    }
}
