//! Bounding and escaping of the text that goes into an audit entry.
//!
//! Owns: the one rule every field of every entry passes through, whatever the caller hands in —
//! control characters (newlines included) are escaped so an entry stays one line and a terminal or
//! syslog collector shows what was there, and a field longer than [`MAX_FIELD_CHARS`] is cut with
//! a marker that says how long it was. A partner's agreement id of 4 MB costs a few hundred bytes.
//!
//! Does not own: deciding what goes into a field (callers pass ids, tokens and reasons, never PHI).

/// Longest text kept in one field, in characters (after escaping).
pub const MAX_FIELD_CHARS: usize = 256;
/// Most patient tokens kept in one entry (a study has one patient; a batch a few).
pub const MAX_TOKENS: usize = 64;

/// `s` with control characters escaped and cut to [`MAX_FIELD_CHARS`].
pub fn bound(s: &str) -> String {
    bound_to(s, MAX_FIELD_CHARS)
}

/// `s` with control characters escaped and cut to `max` characters, with a marker naming the
/// original length in bytes when it was cut.
pub fn bound_to(s: &str, max: usize) -> String {
    let clean = s.chars().all(|c| !c.is_control() && !is_bidi_control(c)) && s.len() <= max;
    if clean {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len().min(max + 48));
    let mut kept = 0usize;
    for c in s.chars() {
        let piece = escape_char(c);
        let n = piece.chars().count();
        if kept + n > max {
            out.push_str(&format!("…[truncated, {} bytes]", s.len()));
            return out;
        }
        out.push_str(&piece);
        kept += n;
    }
    out
}

/// Characters that reorder how text is displayed (a classic way to make a log line lie).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

fn escape_char(c: char) -> String {
    match c {
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        c if c.is_control() || is_bidi_control(c) => format!("\\u{{{:x}}}", c as u32),
        c => c.to_string(),
    }
}

/// Tokens bounded in number and each in length.
pub fn bound_tokens(tokens: &[String]) -> Vec<String> {
    let mut out: Vec<String> = tokens
        .iter()
        .take(MAX_TOKENS)
        .map(|t| bound_to(t, 80))
        .collect();
    if tokens.len() > MAX_TOKENS {
        out.push(format!("…[{} more]", tokens.len() - MAX_TOKENS));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_clean_text_is_kept() {
        assert_eq!(bound("study 2.25.1 to site:b"), "study 2.25.1 to site:b");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(bound("a\nb\r\u{1b}[31m"), "a\\nb\\r\\u{1b}[31m");
        assert_eq!(bound("x\u{202e}y"), "x\\u{202e}y");
    }

    #[test]
    fn long_text_is_cut_with_its_length() {
        let s = "A".repeat(4 * 1024 * 1024);
        let b = bound(&s);
        assert!(b.chars().count() < MAX_FIELD_CHARS + 40);
        assert!(b.ends_with("…[truncated, 4194304 bytes]"));
    }

    #[test]
    fn tokens_are_bounded() {
        let many: Vec<String> = (0..100).map(|i| format!("T{i}")).collect();
        let b = bound_tokens(&many);
        assert_eq!(b.len(), MAX_TOKENS + 1);
        assert_eq!(b.last().unwrap(), "…[36 more]");
    }

    proptest! {
        #[test]
        fn bounded_text_is_one_short_line(s in any::<String>()) {
            let b = bound(&s);
            prop_assert!(!b.chars().any(|c| c.is_control()));
            prop_assert!(b.chars().count() <= MAX_FIELD_CHARS + 40);
        }
    }
}
