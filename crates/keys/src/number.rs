//! Telephone numbers (SPEC §4a): one canonicalization to E.164 for every
//! comparison the edge makes.
//!
//! Values come from the wire (Request-URI, From, P-Asserted-Identity, token
//! claims) and from the operator (allow/deny prefixes, `caller_ids`, route
//! prefixes); both sides go through [`NumberPlan`] before they are compared,
//! so `+19005550100`, `19005550100`, `0019005550100`, `011 1 900 555 0100`
//! and `tel:+1-900-555-0100` are one number.
//!
//! The rules, in order, on the user part (see [`normalize`] for how it is
//! taken out of a URI or name-addr):
//!
//! 1. Visual separators (space `-` `.` `(` `)`) are dropped.
//! 2. A user part that does not start with `+`, a digit, `*` or `#` is a
//!    name ([`Dest::Name`], e.g. `agent`), matched by name only, exactly.
//! 3. Anything else is a number attempt. `+digits` is international; digits
//!    starting with one of `international_prefixes` (longest first) are that
//!    prefix then a country code; other digits are national per
//!    `default_country` (its national prefix, e.g. `1` in the US or `0` in
//!    GB, may lead). `*`, `#`, letters or an unknown country code make it
//!    [`Dest::Invalid`].
//! 4. The result is a [`Dest::Number`] only if libphonenumber's metadata
//!    says its length is possible for its country (a full number, not a
//!    local-only one: `5550100` in the US is invalid); otherwise
//!    [`Dest::Invalid`] (SPEC §4: `484` where a policy needs a number).
//!
//! The metadata is libphonenumber's, through the `rlibphonenumber` port;
//! [`E164::number_type`] gives a number's type (premium rate, shared cost,
//! ...) from the same metadata.

use rlibphonenumber::{PhoneNumber, PhoneNumberFormat, Region, PHONE_NUMBER_UTIL};

/// A number's type per libphonenumber's metadata (premium rate, shared cost...).
pub use rlibphonenumber::PhoneNumberType as NumberType;

use crate::KeyError;

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

fn is_phone_number(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// How national and international dialling forms are read (`[numbers]`).
/// Passed explicitly to every check that compares numbers: no global state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberPlan {
    default_country: String,
    region: Region,
    country_code: i32,
    /// The national (trunk) prefix, e.g. `1` in the US, `0` in GB; may be empty.
    national_prefix: String,
    /// Longest first, so `011` is tried before `0`.
    international_prefixes: Vec<String>,
}

/// The international prefixes of the default plan: `011` (NANP) and `00`
/// (most of the world).
pub const DEFAULT_INTERNATIONAL_PREFIXES: [&str; 2] = ["011", "00"];

impl Default for NumberPlan {
    /// `US`, international prefixes `011` and `00`.
    fn default() -> Self {
        let intl: Vec<String> = DEFAULT_INTERNATIONAL_PREFIXES
            .iter()
            .map(|p| (*p).to_owned())
            .collect();
        match NumberPlan::new("US", &intl) {
            Ok(p) => p,
            // The metadata always knows the US (+1); keep a usable plan anyway.
            Err(_) => NumberPlan {
                default_country: "US".into(),
                region: Region::US,
                country_code: 1,
                national_prefix: "1".into(),
                international_prefixes: intl,
            },
        }
    }
}

impl NumberPlan {
    /// A plan for `default_country` (ISO 3166 alpha-2, e.g. `US`, `GB`) and
    /// `international_prefixes` (digits, e.g. `00`, `011`; may be empty).
    /// Errors name the `[numbers]` field.
    pub fn new<S: AsRef<str>>(
        default_country: &str,
        international_prefixes: &[S],
    ) -> Result<NumberPlan, KeyError> {
        let cc = default_country.trim().to_ascii_uppercase();
        let region = Region::from_code(&cc).map_err(|_| {
            KeyError::Invalid(format!(
                "numbers.default_country: {default_country:?} is not a country code (e.g. \"US\", \"GB\")"
            ))
        })?;
        let country_code = PHONE_NUMBER_UTIL
            .get_country_code_for_region(region)
            .ok_or_else(|| {
                KeyError::Invalid(format!(
                    "numbers.default_country: no numbering plan for {default_country:?}"
                ))
            })?;
        let mut intl = Vec::new();
        for p in international_prefixes {
            let p = p.as_ref();
            if p.is_empty() || p.len() > 6 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(KeyError::Invalid(format!(
                    "numbers.international_prefixes: {p:?} is not a dialling prefix like \"00\""
                )));
            }
            if !intl.iter().any(|q: &String| q == p) {
                intl.push(p.to_owned());
            }
        }
        intl.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        Ok(NumberPlan {
            default_country: cc,
            national_prefix: national_prefix(region),
            region,
            country_code,
            international_prefixes: intl,
        })
    }

    /// The default country (upper case).
    pub fn default_country(&self) -> &str {
        &self.default_country
    }

    /// The international prefixes, longest first.
    pub fn international_prefixes(&self) -> &[String] {
        &self.international_prefixes
    }

    /// Canonicalizes a destination, caller or claim as received (URI,
    /// name-addr, `tel:`, separators, percent escapes; see the module doc).
    pub fn canonicalize(&self, s: &str) -> Dest {
        let user = normalize(s);
        match self.shape(&user) {
            Shape::Name => Dest::Name(user),
            Shape::Digits(d) => match self.number(&d) {
                Some(n) => Dest::Number(n),
                None => Dest::Invalid(d),
            },
            Shape::Bad(d) => Dest::Invalid(d),
        }
    }

    /// Canonicalizes a prefix of a list (allow/deny, `caller_ids`, the edge
    /// deny list, routes): the same rules as [`NumberPlan::canonicalize`]
    /// without the length check, since a prefix is the start of a number.
    /// `None` for a number attempt that is not a number prefix (`+`, `12*`,
    /// an international prefix alone) or an empty entry.
    pub fn prefix(&self, s: &str) -> Option<Prefix> {
        let user = normalize(s);
        if user.is_empty() {
            return None;
        }
        match self.shape(&user) {
            Shape::Name => Some(Prefix::Name(user)),
            Shape::Bad(_) => None,
            Shape::Digits(d) => {
                let intl = self.international_digits(&d)?;
                let digits = match intl {
                    Some(rest) => rest.to_owned(),
                    None => {
                        // National: the plan's national prefix may lead.
                        let ndd = &self.national_prefix;
                        let national = if !ndd.is_empty() && d.starts_with(ndd.as_str()) {
                            &d[ndd.len()..]
                        } else {
                            d.as_str()
                        };
                        format!("{}{national}", self.country_code)
                    }
                };
                (!digits.is_empty()).then(|| Prefix::Number(format!("+{digits}")))
            }
        }
    }

    /// `Some(Some(rest))`: international, `rest` after `+` or the prefix
    /// (may be empty); `Some(None)`: national; `None`: a prefix alone.
    fn international_digits<'a>(&self, d: &'a str) -> Option<Option<&'a str>> {
        if let Some(rest) = d.strip_prefix('+') {
            return Some(Some(rest));
        }
        for p in &self.international_prefixes {
            if let Some(rest) = d.strip_prefix(p.as_str()) {
                return (!rest.is_empty()).then_some(Some(rest));
            }
        }
        Some(None)
    }

    fn shape(&self, user: &str) -> Shape {
        let compact: String = user
            .chars()
            .filter(|c| !VISUAL_SEPARATORS.contains(c))
            .collect();
        match compact.chars().next() {
            Some(c) if c == '+' || c == '*' || c == '#' || c.is_ascii_digit() => {}
            _ => return Shape::Name,
        }
        if is_phone_number(&compact) {
            Shape::Digits(compact)
        } else {
            Shape::Bad(compact)
        }
    }

    /// A full number (digits with an optional leading `+`) in E.164, if the
    /// metadata knows its country code and its length is possible there.
    fn number(&self, d: &str) -> Option<E164> {
        let (text, region) = match self.international_digits(d)? {
            Some(rest) => (format!("+{rest}"), None),
            None => (d.to_owned(), Some(self.region)),
        };
        let n = PHONE_NUMBER_UTIL.parse(&text, region).ok()?;
        // A national form whose country code is not the plan's was read by
        // libphonenumber as an international call through the country's
        // own prefix, which the operator did not list: not ours to guess.
        if region.is_some() && n.country_code != self.country_code {
            return None;
        }
        if n.extension.as_deref().is_some_and(|e| !e.is_empty()) {
            return None;
        }
        match PHONE_NUMBER_UTIL.is_possible_number_with_reason(&n) {
            Ok(rlibphonenumber::NumberLengthType::IsPossible) => {}
            _ => return None,
        }
        let e164 = PHONE_NUMBER_UTIL
            .format(&n, PhoneNumberFormat::E164)
            .into_owned();
        Some(E164 {
            text: e164,
            number: Box::new(n),
        })
    }
}

/// The region's national prefix, found through the metadata: the shortest
/// one- or two-digit string that libphonenumber strips from the front of the
/// region's example number (the port does not expose the field itself).
fn national_prefix(region: Region) -> String {
    let Ok(example) = PHONE_NUMBER_UTIL.get_example_number(region) else {
        return String::new();
    };
    let nsn = rlibphonenumber::get_national_significant_number_owned(&example);
    let want = PHONE_NUMBER_UTIL.format(&example, PhoneNumberFormat::E164);
    let candidates = (0..10)
        .map(|d| d.to_string())
        .chain((0..100).map(|d| format!("{d:02}")));
    for c in candidates {
        if let Ok(n) = PHONE_NUMBER_UTIL.parse(format!("{c}{nsn}"), Some(region)) {
            if PHONE_NUMBER_UTIL.format(&n, PhoneNumberFormat::E164) == want {
                return c;
            }
        }
    }
    String::new()
}

enum Shape {
    Name,
    /// Digits with an optional leading `+`, separators dropped.
    Digits(String),
    /// Starts like a number but holds other characters (`*`, `#`, letters).
    Bad(String),
}

/// A number in E.164 form, `+<country code><number>`, as the metadata reads it.
#[derive(Debug, Clone)]
pub struct E164 {
    text: String,
    /// Boxed: keeps [`Dest`] (two in every accepted call) small.
    number: Box<PhoneNumber>,
}

impl PartialEq for E164 {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for E164 {}

impl E164 {
    /// `+<digits>`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The number's type per libphonenumber's metadata (premium rate, shared
    /// cost, mobile, ...; `Unknown` when no range of its country matches).
    pub fn number_type(&self) -> NumberType {
        PHONE_NUMBER_UTIL.get_number_type(&self.number)
    }

    /// True if the number is of one of `types`, or, when the metadata
    /// knows no range for it (an unallocated or mistyped number, `Unknown`),
    /// if it becomes one with up to 3 digits dropped or added (zeros) at the end: a
    /// carrier may still route a premium number dialled a digit short or
    /// long (`011 44 909 090 123` is GB 0909 premium, one digit short).
    pub fn is_of_type_or_near(&self, types: &[NumberType]) -> bool {
        let ty = self.number_type();
        if types.contains(&ty) {
            return true;
        }
        if ty != NumberType::Unknown || types.is_empty() {
            return false;
        }
        // Ranges are told apart by their leading digits; the last ones are
        // any digit, so 0 stands for every digit added.
        let of_type = |national: u64| {
            let mut n = (*self.number).clone();
            n.national_number = national;
            // The length check first: it is cheap, the type check is not
            // (for +1 it tries every NANP region).
            types
                .iter()
                .any(|t| PHONE_NUMBER_UTIL.is_possible_number_for_type(&n, *t))
                && types.contains(&PHONE_NUMBER_UTIL.get_number_type(&n))
        };
        let nn = self.number.national_number;
        let (mut cut, mut padded) = (nn, nn);
        for _ in 1..=3 {
            cut /= 10;
            if cut >= 100 && of_type(cut) {
                return true;
            }
            padded = match padded.checked_mul(10) {
                Some(p) if p < 100_000_000_000_000_000 => p,
                _ => return false,
            };
            if of_type(padded) {
                return true;
            }
        }
        false
    }

    /// True if the number starts with `prefix` (a [`Prefix::Number`]).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.text.starts_with(prefix)
    }
}

impl std::fmt::Display for E164 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A destination or caller identity after canonicalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A number in E.164.
    Number(E164),
    /// A SIP name such as `agent` (the user part, unescaped).
    Name(String),
    /// A number attempt that is not a number (the digits and signs as
    /// received, separators dropped).
    Invalid(String),
}

impl Dest {
    /// The canonical text: E.164 for a number, the name, or what was received.
    pub fn as_str(&self) -> &str {
        match self {
            Dest::Number(n) => n.as_str(),
            Dest::Name(s) | Dest::Invalid(s) => s,
        }
    }

    /// The number, if it is one.
    pub fn number(&self) -> Option<&E164> {
        match self {
            Dest::Number(n) => Some(n),
            _ => None,
        }
    }

    /// True if `prefix` matches: a number prefix matches numbers starting
    /// with it, a name matches that name exactly; a number prefix never
    /// matches a name, nor anything an invalid number.
    pub fn matches(&self, prefix: &Prefix) -> bool {
        match (self, prefix) {
            (Dest::Number(n), Prefix::Number(p)) => n.has_prefix(p),
            (Dest::Name(n), Prefix::Name(p)) => n == p,
            _ => false,
        }
    }

    /// True if any of `prefixes` matches (see [`Dest::matches`]).
    pub fn matches_any(&self, prefixes: &[Prefix]) -> bool {
        prefixes.iter().any(|p| self.matches(p))
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry of a prefix list, canonical ([`NumberPlan::prefix`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Prefix {
    /// `+<digits>`: matches numbers that start with it.
    Number(String),
    /// A name, matched exactly.
    Name(String),
}

impl Prefix {
    /// The canonical text.
    pub fn as_str(&self) -> &str {
        match self {
            Prefix::Number(s) | Prefix::Name(s) => s,
        }
    }

    /// True if every destination `self` matches is also matched by `outer`
    /// (a child's allow prefix inside its parent's).
    pub fn within(&self, outer: &Prefix) -> bool {
        match (self, outer) {
            (Prefix::Number(a), Prefix::Number(b)) => a.starts_with(b.as_str()),
            (Prefix::Name(a), Prefix::Name(b)) => a == b,
            _ => false,
        }
    }
}

/// Checks a list given for a key (CLI flag or admin API field): each entry
/// must be a number prefix in some form or a name. Entries are stored as
/// given and canonicalized under the edge's plan when the key is first used.
pub fn check_list<S: AsRef<str>>(field: &str, list: &[S]) -> Result<(), String> {
    let plan = NumberPlan::default();
    for p in list {
        let p = p.as_ref();
        if p.len() > 64 || p.chars().any(char::is_control) || plan.prefix(p).is_none() {
            return Err(format!(
                "{field}: {p:?} is neither a number prefix (e.g. +1415, 0044, 1900) nor a name"
            ));
        }
    }
    Ok(())
}

/// Canonicalizes a prefix list once (when keys or the configuration load);
/// entries that are no prefix ([`NumberPlan::prefix`] gives `None`) are
/// returned as the error, for a message naming the field.
pub fn prefix_list<S: AsRef<str>>(plan: &NumberPlan, list: &[S]) -> Result<Vec<Prefix>, String> {
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        match plan.prefix(p.as_ref()) {
            Some(c) => out.push(c),
            None => return Err(p.as_ref().to_owned()),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
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

    fn plan() -> NumberPlan {
        NumberPlan::default()
    }

    fn num(s: &str) -> String {
        match plan().canonicalize(s) {
            Dest::Number(n) => n.as_str().to_owned(),
            d => panic!("{s:?}: {d:?}"),
        }
    }

    #[test]
    fn every_form_is_one_number() {
        for form in [
            "+19005550100",
            "19005550100",
            "9005550100",
            "0019005550100",
            "01119005550100",
            "011 1 900 555 0100",
            "+1 (900) 555-0100",
            "1.900.555.0100",
            "tel:+1-900-555-0100",
            "tel:19005550100;phone-context=+1",
            "sip:+19005550100@carrier.example;user=phone",
            "sips:19005550100@edge:5061;transport=tls",
            "<sip:%2B19005550100@h>",
            "\"Bob\" <sip:001-900-555-0100@h>;tag=1",
            "%2B1%20900%20555%200100",
        ] {
            assert_eq!(num(form), "+19005550100", "{form:?}");
        }
        for (form, want) in [
            ("00449090901234", "+449090901234"),
            ("01144909090123", "+44909090123"),
            ("+44 (0)20 7946 0000", "+442079460000"),
            ("+4402079460000", "+442079460000"),
            ("0033 1 42 68 53 00", "+33142685300"),
            ("+979 1 2345 6789", "+979123456789"),
        ] {
            assert_eq!(num(form), want, "{form:?}");
        }
    }

    #[test]
    fn national_forms_follow_the_default_country() {
        let gb = NumberPlan::new("gb", &["00"]).unwrap();
        assert_eq!(gb.default_country(), "GB");
        let n = |s: &str| gb.canonicalize(s).as_str().to_owned();
        assert_eq!(n("020 7946 0000"), "+442079460000");
        assert_eq!(n("0909 090 1234"), "+449090901234");
        assert_eq!(n("0019005550100"), "+19005550100");
        // 011 is not an international prefix in this plan: Sheffield.
        assert_eq!(n("0114 496 0000"), "+441144960000");
        let de = NumberPlan::new("DE", &["00"]).unwrap();
        assert_eq!(de.canonicalize("0900 1234567").as_str(), "+499001234567");
        assert!(NumberPlan::new("XX", &["00"])
            .unwrap_err()
            .to_string()
            .contains("numbers.default_country"));
        assert!(NumberPlan::new("US", &["0a"])
            .unwrap_err()
            .to_string()
            .contains("numbers.international_prefixes"));
    }

    #[test]
    fn names_stay_names_invalid_numbers_are_invalid() {
        let p = plan();
        for name in [
            "agent",
            "support-agent",
            "sip:alice@example.com",
            "Agent",
            "",
            "sip:@h",
            "é",
        ] {
            assert!(matches!(p.canonicalize(name), Dest::Name(_)), "{name:?}");
        }
        assert_eq!(p.canonicalize("sip:agent@h;user=x").as_str(), "agent");
        for bad in [
            "+",
            "011",
            "00",
            "12345",
            "5550100",
            "+1",
            "+999 1234 5678",
            "*67 1900 555 0100",
            "1900555010#",
            "1-900-PREMIUM",
            "+1900555010012345",
        ] {
            assert!(
                matches!(p.canonicalize(bad), Dest::Invalid(_)),
                "{bad:?}: {:?}",
                p.canonicalize(bad)
            );
        }
    }

    #[test]
    fn prefixes_match_across_forms_and_never_names() {
        let p = plan();
        let list = prefix_list(&p, &["+1 900", "011 44 9", "1976", "agent"]).unwrap();
        assert_eq!(
            list,
            vec![
                Prefix::Number("+1900".into()),
                Prefix::Number("+1976".into()),
                Prefix::Number("+449".into()),
                Prefix::Name("agent".into())
            ]
        );
        for d in ["19005550100", "+1 976 555 0100", "00449090901234", "agent"] {
            assert!(p.canonicalize(d).matches_any(&list), "{d}");
        }
        for d in ["+14155550100", "agent2", "Agent", "12345"] {
            assert!(!p.canonicalize(d).matches_any(&list), "{d}");
        }
        // A national-form prefix in the US plan: 900 is +1900.
        assert_eq!(p.prefix("900"), Some(Prefix::Number("+1900".into())));
        for bad in ["+", "011", "", "12*", "+1-CALL"] {
            assert_eq!(p.prefix(bad), None, "{bad:?}");
        }
        assert!(prefix_list(&p, &["+1", "011"]).is_err());
        assert!(Prefix::Number("+1415".into()).within(&Prefix::Number("+1".into())));
        assert!(!Prefix::Number("+1".into()).within(&Prefix::Number("+1415".into())));
        assert!(!Prefix::Name("agent".into()).within(&Prefix::Number("+1".into())));
    }

    #[test]
    fn number_types_from_metadata() {
        use rlibphonenumber::PhoneNumberType as T;
        let ty = |s: &str| plan().canonicalize(s).number().map(|n| n.number_type());
        assert_eq!(ty("+19005550100"), Some(T::PremiumRate));
        assert_eq!(ty("+449090901234"), Some(T::PremiumRate));
        // GB 084x: shared cost in older metadata, premium rate in newer.
        assert!(matches!(
            ty("+448450000000"),
            Some(T::SharedCost | T::PremiumRate)
        ));
        assert_eq!(ty("+33810123456"), Some(T::SharedCost));
        assert_eq!(ty("+14155550100"), Some(T::FixedLineOrMobile));
    }
}
