//! Normalisation of telephone numbers and SIP user parts (SPEC §3).
//!
//! Values come from the wire (Request-URI, From, P-Asserted-Identity, token
//! claims) and from the operator (allow/deny prefixes); both sides are put in
//! the same normal form before they are compared.

/// Visual separators dropped from phone numbers (RFC 3966 plus space).
const VISUAL_SEPARATORS: &[char] = &[' ', '-', '.', '(', ')'];

/// Normalises a number or SIP user part.
///
/// 1. Trims whitespace and, for a name-addr, takes what is inside `<…>`.
/// 2. Strips a `sip:`, `sips:` or `tel:` scheme (case-insensitive).
/// 3. Takes the user part of `user@host` and drops URI parameters and headers
///    (`;…`, `?…`) and a deprecated `:password`.
/// 4. Percent-decodes (RFC 3261 compares user parts unescaped), so `%2B1900…`
///    cannot slip past a `+1900` deny prefix.
/// 5. If what is left, without visual separators (space `-` `.` `(` `)`), is
///    digits with an optional leading `+`, returns that; otherwise returns the
///    user part unchanged (e.g. `alice`, `support-agent`).
///
/// ```
/// use tollgate_keys::number::normalize;
/// assert_eq!(normalize("sip:+1 (415) 555-0100@example.com;user=phone"), "+14155550100");
/// assert_eq!(normalize("tel:+1-415-555-0100"), "+14155550100");
/// assert_eq!(normalize("alice"), "alice");
/// ```
pub fn normalize(s: &str) -> String {
    let mut s = s.trim();
    if let (Some(open), Some(close)) = (s.find('<'), s.rfind('>')) {
        if open < close {
            s = s[open + 1..close].trim();
        }
    }
    for scheme in ["sips:", "sip:", "tel:"] {
        if s.len() >= scheme.len()
            && s.is_char_boundary(scheme.len())
            && s[..scheme.len()].eq_ignore_ascii_case(scheme)
        {
            s = &s[scheme.len()..];
            break;
        }
    }
    // User part: before '@' (sip), then before any parameter/header/password.
    if let Some(at) = s.find('@') {
        s = &s[..at];
    }
    if let Some(end) = s.find([';', '?', ':']) {
        s = &s[..end];
    }
    let user = percent_decode(s);
    let compact: String = user
        .chars()
        .filter(|c| !VISUAL_SEPARATORS.contains(c))
        .collect();
    if is_phone_number(&compact) {
        compact
    } else {
        user
    }
}

/// True if `number` starts with `prefix`, both normalised with [`normalize`].
///
/// A prefix with a leading `+` matches only numbers with that `+` (`+1900`
/// matches `+19005551234`, not `19005551234`). A prefix without `+` matches
/// the number with or without its leading `+` (`1900` matches both
/// `+19005551234` and `19005551234`), so an operator who forgets the `+` in a
/// deny list still blocks E.164 numbers. National formats (`00…`, `011…`)
/// are not rewritten: list them as separate prefixes if they can reach you.
/// An empty prefix matches everything.
pub fn matches_prefix(number: &str, prefix: &str) -> bool {
    let n = normalize(number);
    let p = normalize(prefix);
    if n.starts_with(&p) {
        return true;
    }
    !p.starts_with('+') && n.strip_prefix('+').is_some_and(|rest| rest.starts_with(&p))
}

fn is_phone_number(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Decodes `%XX` escapes; returns the input unchanged if an escape is invalid
/// or the result is not UTF-8.
fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    out.push(v);
                    i += 3;
                }
                None => return s.to_owned(),
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_forms() {
        let cases = [
            ("+14155550100", "+14155550100"),
            ("+1 415 555 0100", "+14155550100"),
            ("+1 (415) 555-0100", "+14155550100"),
            ("+1.415.555.0100", "+14155550100"),
            ("sip:+14155550100@edge.example.com", "+14155550100"),
            ("SIP:+14155550100@edge.example.com:5060", "+14155550100"),
            ("sips:+14155550100@edge;transport=tls", "+14155550100"),
            (
                "sip:+1-415-555-0100;phone-context=x@h;user=phone",
                "+14155550100",
            ),
            ("tel:+1-415-555-0100", "+14155550100"),
            ("tel:+1-415-555-0100;ext=12", "+14155550100"),
            ("<sip:+14155550100@h>", "+14155550100"),
            ("\"Bob\" <sip:bob@h>;tag=1", "bob"),
            ("sip:alice@example.com", "alice"),
            ("alice", "alice"),
            ("support-agent", "support-agent"),
            ("sip:user:pw@host", "user"),
            ("%2B19005551234", "+19005551234"),
            ("%zz1", "%zz1"),
            ("%", "%"),
            ("%f", "%f"),
            ("%ff", "%ff"),
            ("", ""),
            ("+", "+"),
            ("sip:@host", ""),
            ("é", "é"),
            ("si", "si"),
            ("té:1", "té"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want, "{input:?}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(matches_prefix("+19005551234", "+1900"));
        assert!(matches_prefix("+1 (900) 555-1234", "+1900"));
        assert!(matches_prefix("sip:+19005551234@h", "+1 900"));
        assert!(matches_prefix("%2B19005551234", "+1900"));
        assert!(!matches_prefix("19005551234", "+1900"));
        assert!(matches_prefix("19005551234", "1900"));
        assert!(matches_prefix("+19005551234", "1900"));
        assert!(!matches_prefix("+14155550100", "+1900"));
        assert!(!matches_prefix("+14155550100", "900"));
        assert!(matches_prefix("alice", "al"));
        assert!(matches_prefix("anything", ""));
    }
}
