//! Edge-wide destination policy: the premium-rate deny list.
//!
//! Per-key allow and deny prefixes are checked where the key is known (the
//! credential check in `tollgate-keys`); this list applies to every key and is
//! on by default, so that a stolen key cannot be used for revenue-share fraud
//! (IRSF) before anyone has configured anything.

use tollgate_keys::number::normalize;

/// The default premium-rate / revenue-share deny list (E.164 prefixes).
///
/// Chosen to block the number ranges most used for toll fraud while leaving
/// ordinary geographic and mobile numbers alone (deliberately *not* blocking
/// whole countries such as the Caribbean NANP areas that are often abused:
/// that is an operator's choice, made with `premium_deny_prefixes`).
///
/// | prefix | what |
/// |---|---|
/// | `+1900`, `+1976` | NANP premium-rate (900) and the old 976 pay-per-call range |
/// | `+449`, `+4487`, `+4470` | UK 09 premium rate (incl. 0908/0909), 087 revenue-share, 070 "personal numbers" |
/// | `+3389` | France 089x premium rate (Audiotel, incl. 0899) |
/// | `+49900`, `+49137`, `+49118` | Germany 0900 premium, 0137 mass-calling, 0118 directory enquiries |
/// | `+39899`, `+39892`, `+39894`, `+39895` | Italy premium rate |
/// | `+34803`, `+34806`, `+34807`, `+34905` | Spain premium rate and mass-calling |
/// | `+31900`, `+31906`, `+31909` | Netherlands premium rate |
/// | `+3290` | Belgium 090x premium rate |
/// | `+43900`, `+43930`, `+43931`, `+43939` | Austria premium rate |
/// | `+41900`, `+41901`, `+41906` | Switzerland premium rate |
/// | `+61190` | Australia 1900 premium rate |
/// | `+979` | ITU International Premium Rate Service |
/// | `+881`, `+882`, `+883`, `+870` | global satellite / international networks (high-cost, IRSF hot spots) |
pub const DEFAULT_PREMIUM_DENY_PREFIXES: &[&str] = &[
    "+1900", "+1976", //
    "+449", "+4487", "+4470", //
    "+3389", //
    "+49900", "+49137", "+49118", //
    "+39899", "+39892", "+39894", "+39895", //
    "+34803", "+34806", "+34807", "+34905", //
    "+31900", "+31906", "+31909", //
    "+3290",  //
    "+43900", "+43930", "+43931", "+43939", //
    "+41900", "+41901", "+41906", //
    "+61190", //
    "+979",   //
    "+881", "+882", "+883", "+870",
];

/// A deny list with its prefixes normalised once, up front.
#[derive(Debug, Clone, Default)]
pub struct DenyList {
    prefixes: Vec<String>,
}

impl DenyList {
    /// Normalises each prefix with [`tollgate_keys::number::normalize`].
    /// An empty prefix matches every destination (as in `tollgate-keys`).
    pub fn new<S: AsRef<str>>(prefixes: &[S]) -> Self {
        let mut prefixes: Vec<String> = prefixes.iter().map(|p| normalize(p.as_ref())).collect();
        prefixes.sort();
        prefixes.dedup();
        DenyList { prefixes }
    }

    /// True if `destination` (as received: URI, tel:, with separators...) is on
    /// the list. Same semantics as [`tollgate_keys::number::matches_prefix`],
    /// but the destination is normalised once, not once per prefix.
    pub fn denies(&self, destination: &str) -> bool {
        if self.prefixes.is_empty() {
            return false;
        }
        let n = normalize(destination);
        let unplussed = n.strip_prefix('+');
        self.prefixes.iter().any(|p| {
            n.starts_with(p.as_str())
                || (!p.starts_with('+')
                    && unplussed.is_some_and(|rest| rest.starts_with(p.as_str())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_keys::number::matches_prefix;

    #[test]
    fn default_list_blocks_premium_not_ordinary() {
        let d = DenyList::new(DEFAULT_PREMIUM_DENY_PREFIXES);
        for n in [
            "+19005551234",
            "sip:+1-900-555-1234@carrier.example;user=phone",
            "tel:+44 909 876 5432",
            "%2B448712345678",
            "+33899123456",
            "+4990012345678",
            "+97912345678",
            "<sip:+881612345678@h>",
        ] {
            assert!(d.denies(n), "{n}");
        }
        for n in [
            "+14155550100",
            "+442079460000",
            "+33142685300",
            "+4930123456",
            "+49906123456", // Donauwörth, not 0900
            "support-agent",
            "",
        ] {
            assert!(!d.denies(n), "{n}");
        }
    }

    #[test]
    fn same_semantics_as_keys_matches_prefix() {
        let prefixes = ["+1900", "1976", "+44 909", "al", "900"];
        let d = DenyList::new(&prefixes);
        for n in [
            "+19005551234",
            "19005551234",
            "+19765551234",
            "19765551234",
            "+449091234",
            "alice",
            "bob",
            "+14155550100",
            "9001",
            "+9001",
        ] {
            let want = prefixes.iter().any(|p| matches_prefix(n, p));
            assert_eq!(d.denies(n), want, "{n}");
        }
    }

    #[test]
    fn empty_list_denies_nothing_empty_prefix_denies_all() {
        assert!(!DenyList::new::<&str>(&[]).denies("+19005551234"));
        assert!(DenyList::new(&[""]).denies("+14155550100"));
    }
}
