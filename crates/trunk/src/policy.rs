//! Edge-wide destination policy: the premium-rate / revenue-share deny list
//! (SPEC §4a).
//!
//! Per-key allow and deny prefixes are checked where the key is known (the
//! credential check in `tollgate-keys`); this list applies to every key and is
//! on by default, so that a stolen key cannot be used for revenue-share fraud
//! (IRSF) before anyone has configured anything. It has two parts, both on
//! canonical (E.164) destinations:
//!
//! * number types: every number that libphonenumber's metadata classifies as
//!   premium rate or shared cost, in every country (`premium_deny_types`),
//!   and every number the metadata cannot type that becomes one of those
//!   with up to 3 digits dropped or added at the end
//!   ([`tollgate_keys::number::E164::is_of_type_or_near`]);
//! * prefixes: the international revenue-share ranges that the metadata does
//!   not type as premium ([`DEFAULT_PREMIUM_DENY_PREFIXES`]), plus whatever
//!   the operator adds.

use tollgate_keys::number::{prefix_list, Dest, NumberPlan, NumberType, Prefix, E164};

/// The default revenue-share deny prefixes (E.164), on top of the type check.
///
/// Ranges sold for International Revenue Share Fraud that the metadata does
/// not (or not always) type premium rate, chosen to leave ordinary
/// geographic and mobile numbers alone (deliberately *not* whole countries
/// such as the Caribbean NANP areas that are often abused: that is an
/// operator's choice, made with `premium_deny_extra_prefixes`).
///
/// | prefix | what |
/// |---|---|
/// | `+979` | ITU International Premium Rate Service (IPRS) |
/// | `+881` | Global Mobile Satellite System (Iridium, Globalstar, ...) |
/// | `+882`, `+883` | International Networks (ITU-assigned carriers without a country) |
/// | `+870` | Inmarsat single network access code |
/// | `+4470` | UK 070 "personal numbers": revenue-share, a classic fraud range (typed personal, not premium) |
/// | `+1976` | NANP 976 pay-per-call exchange (legacy, still billed premium by some carriers) |
pub const DEFAULT_PREMIUM_DENY_PREFIXES: &[&str] =
    &["+979", "+881", "+882", "+883", "+870", "+4470", "+1976"];

/// The number types denied by default (names as in `premium_deny_types`).
pub const DEFAULT_PREMIUM_DENY_TYPES: &[&str] = &["premium_rate", "shared_cost"];

/// The names `premium_deny_types` accepts, and the metadata types they are.
pub const NUMBER_TYPE_NAMES: &[(&str, NumberType)] = &[
    ("premium_rate", NumberType::PremiumRate),
    ("shared_cost", NumberType::SharedCost),
    ("personal_number", NumberType::PersonalNumber),
    ("uan", NumberType::UAN),
    ("voip", NumberType::VoIP),
    ("pager", NumberType::Pager),
    ("voicemail", NumberType::VoiceMail),
    ("toll_free", NumberType::TollFree),
    ("mobile", NumberType::Mobile),
    ("fixed_line", NumberType::FixedLine),
    ("fixed_line_or_mobile", NumberType::FixedLineOrMobile),
    ("unknown", NumberType::Unknown),
];

/// The metadata type called `name` in `premium_deny_types`.
pub fn number_type(name: &str) -> Option<NumberType> {
    NUMBER_TYPE_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
}

/// A deny list canonicalized once, up front (at configuration load).
#[derive(Debug, Clone, Default)]
pub struct DenyList {
    prefixes: Vec<Prefix>,
    types: Vec<NumberType>,
    /// The type check of numbers seen lately (E.164 -> denied): typing a
    /// number runs libphonenumber's regexes (1-11 us, up to 7 times for a
    /// number the metadata does not know), while an edge sees the same
    /// destinations again and again. Bounded: emptied when full.
    typed: TypeCache,
}

/// Entries of [`DenyList`]'s type cache before it is emptied.
const TYPE_CACHE_MAX: usize = 4096;

#[derive(Debug, Default)]
struct TypeCache(dashmap::DashMap<Box<str>, bool>);

impl Clone for TypeCache {
    /// A fresh, empty cache: a copied list (a reload) types afresh.
    fn clone(&self) -> Self {
        TypeCache::default()
    }
}

impl DenyList {
    /// A list of `prefixes` (canonicalized under `plan`) and number `types`
    /// (names of [`NUMBER_TYPE_NAMES`]). The error names the entry that is
    /// neither a number prefix nor a known type.
    pub fn new<S: AsRef<str>, T: AsRef<str>>(
        plan: &NumberPlan,
        prefixes: &[S],
        types: &[T],
    ) -> Result<DenyList, String> {
        let prefixes = prefix_list(plan, prefixes)
            .map_err(|bad| format!("{bad:?} is not a number prefix like \"+1900\""))?;
        if let Some(Prefix::Name(n)) = prefixes.iter().find(|p| matches!(p, Prefix::Name(_))) {
            return Err(format!("{n:?} is not a number prefix like \"+1900\""));
        }
        let mut ts = Vec::new();
        for t in types {
            let t = t.as_ref();
            let ty = number_type(t).ok_or_else(|| {
                let names: Vec<&str> = NUMBER_TYPE_NAMES.iter().map(|(n, _)| *n).collect();
                format!("{t:?} is not a number type ({})", names.join(", "))
            })?;
            if !ts.contains(&ty) {
                ts.push(ty);
            }
        }
        Ok(DenyList {
            prefixes,
            types: ts,
            typed: TypeCache::default(),
        })
    }

    /// [`E164::is_of_type_or_near`] through the cache.
    fn of_type(&self, n: &E164) -> bool {
        if self.types.is_empty() {
            return false;
        }
        if let Some(hit) = self.typed.0.get(n.as_str()) {
            return *hit;
        }
        let denied = n.is_of_type_or_near(&self.types);
        if self.typed.0.len() >= TYPE_CACHE_MAX {
            self.typed.0.clear();
        }
        self.typed.0.insert(n.as_str().into(), denied);
        denied
    }

    /// True if the list checks anything (then every number attempt must be
    /// a number the edge can canonicalize: SPEC §4, `484`).
    pub fn is_active(&self) -> bool {
        !self.prefixes.is_empty() || !self.types.is_empty()
    }

    /// True if the canonical `destination` is on the list. Names are never
    /// on it; a number attempt that is no number is, while the list is on
    /// (the credential check answers those `484` before they get here).
    pub fn denies(&self, destination: &Dest) -> bool {
        match destination {
            Dest::Number(n) => destination.matches_any(&self.prefixes) || self.of_type(n),
            Dest::Name(_) => false,
            Dest::Invalid(_) => self.is_active(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_list() -> DenyList {
        DenyList::new(
            &NumberPlan::default(),
            DEFAULT_PREMIUM_DENY_PREFIXES,
            DEFAULT_PREMIUM_DENY_TYPES,
        )
        .unwrap()
    }

    fn dest(s: &str) -> Dest {
        NumberPlan::default().canonicalize(s)
    }

    #[test]
    fn the_type_cache_answers_as_the_metadata_and_stays_bounded() {
        let d = default_list();
        for _ in 0..3 {
            assert!(d.denies(&dest("+19005550100")));
            assert!(d.denies(&dest("01144909090123"))); // near a GB 0909 number
            assert!(!d.denies(&dest("+14155550100")));
            assert!(!d.denies(&dest("+15551230000")));
        }
        for i in 0..(TYPE_CACHE_MAX as u64 + 10) {
            d.denies(&dest(&format!("+1415555{:04}", i % 10_000)));
        }
        assert!(d.typed.0.len() <= TYPE_CACHE_MAX);
        assert!(d.denies(&dest("+19005550100")));
        assert!(d.clone().typed.0.is_empty(), "a reloaded list types afresh");
    }

    #[test]
    fn default_list_blocks_premium_and_shared_cost_everywhere() {
        let d = default_list();
        for n in [
            // US 900, every form.
            "+19005550100",
            "19005550100",
            "9005550100",
            "0019005550100",
            "011 1 900 555 0100",
            "sip:+1-900-555-0100@carrier.example;user=phone",
            // GB 09 premium, 084/087 (shared cost or premium by metadata version).
            "tel:+44 909 090 1234",
            "00449090901234",
            "01144909090123",
            "%2B448712345678",
            "+448450000000",
            "+447012345678",
            // DE 0900, FR 089x premium and 081x shared cost.
            "+499001234567",
            "+33899123456",
            "+33810123456",
            // IT 899, ES 803, AU 1900, NL 0900.
            "+39899123456",
            "+34803123456",
            "+61190012345",
            "+31900123456",
            // IRSF ranges.
            "+979123456789",
            "<sip:+881612345678@h>",
            "+88213100000",
            "+883510000000",
            "+870772123456",
        ] {
            assert!(d.denies(&dest(n)), "{n}: {:?}", dest(n));
        }
        for n in [
            "+14155550100",
            "14155550100",
            "+442079460000",
            "+33142685300",
            "+4930123456",
            "+49906123456", // Donauwörth, not 0900
            "+18005550100", // toll free
            "support-agent",
            "",
        ] {
            assert!(!d.denies(&dest(n)), "{n}");
        }
        // A number attempt that is no number is denied while the list is on.
        assert!(d.denies(&dest("12345")));
    }

    #[test]
    fn operators_extend_or_replace() {
        let plan = NumberPlan::default();
        // Extend: a Caribbean area code as a national-form prefix.
        let d = DenyList::new(&plan, &["876", "+1900"], &["premium_rate"]).unwrap();
        assert!(d.denies(&dest("+18765550100")));
        assert!(d.denies(&dest("0033899123456")));
        // Replace: no type check, own list only.
        let d = DenyList::new::<_, &str>(&plan, &["+44"], &[]).unwrap();
        assert!(!d.denies(&dest("+19005550100")));
        assert!(d.denies(&dest("+442079460000")));
        // Off: nothing denied, nothing needs to be a number.
        let off = DenyList::new::<&str, &str>(&plan, &[], &[]).unwrap();
        assert!(!off.is_active());
        assert!(!off.denies(&dest("+19005550100")) && !off.denies(&dest("12345")));
        // Errors name the entry.
        assert!(DenyList::new(&plan, &["agent"], &["premium_rate"])
            .unwrap_err()
            .contains("agent"));
        assert!(DenyList::new(&plan, &["+"], &["premium_rate"])
            .unwrap_err()
            .contains("\"+\""));
        assert!(DenyList::new(&plan, &["+1"], &["premium"])
            .unwrap_err()
            .contains("premium_rate"));
    }
}
