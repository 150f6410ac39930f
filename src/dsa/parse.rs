//! The DSA reader: TOML text -> [`Agreement`], collecting every error with its byte position.
//!
//! It walks a span-preserving TOML document (toml_edit) by hand rather than through serde, so
//! that it reports all errors at once (not only the first), points at the exact key or value,
//! and can suggest the key or word the writer probably meant.

use std::collections::{BTreeMap, BTreeSet};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, TagRange};
use dicom_core::Tag;
use dicom_dictionary_std::StandardDataDictionary;
use time::{Date, Month};
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::identifiers::known_keywords;
use super::model::*;
use super::Located;
use crate::deid::{
    AttributeOverride, BurnedInTextMode, DeidConfig, OverrideAction, PixelCleanRule, ProfileOption,
    SafePrivate,
};

/// Byte offsets of the keys and values of a parsed file, by path (`flows[0].deid.options[1]`),
/// so that lints can point at the line they are about.
#[derive(Debug, Clone, Default)]
pub struct Spans(BTreeMap<String, usize>);

impl Spans {
    /// The offset recorded for `path`, or for its nearest recorded ancestor, or 0.
    pub fn at(&self, path: &str) -> usize {
        let mut p = path;
        loop {
            if let Some(&at) = self.0.get(p) {
                return at;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return 0,
            }
        }
    }
}

/// The outcome of reading one file.
#[derive(Debug)]
pub struct Parsed {
    /// The agreement, when there was no error.
    pub agreement: Option<Agreement>,
    pub errors: Vec<Located>,
    pub spans: Spans,
}

/// One TOML table being read, with where it starts and how to name it in messages.
#[derive(Clone, Copy)]
struct Tbl<'d> {
    t: &'d dyn TableLike,
    at: usize,
}

struct Reader<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<Located>,
    spans: Spans,
}

/// Whether a key must be present.
#[derive(Clone, Copy, PartialEq)]
enum Need {
    Required,
    Optional,
}
use Need::*;

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `candidates` to `word`, if close enough to be a likely typo.
pub(crate) fn suggest<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn hint(word: &str, candidates: &[&str]) -> String {
    match suggest(word, candidates.iter().copied()) {
        Some(s) => format!("; did you mean {s:?}?"),
        None => format!("; expected one of: {}", candidates.join(", ")),
    }
}

fn is_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.' | b'_')
        })
}

impl<'a> Reader<'a> {
    fn error(&mut self, at: usize, message: impl Into<String>) {
        self.errors
            .push(Located::at(self.file, self.text, at, message));
    }

    fn mark(&mut self, path: &str, at: usize) {
        self.spans.0.insert(path.to_string(), at);
    }

    /// Reports every key of `t` that is not in `allowed`.
    fn keys(&mut self, t: Tbl, name: &str, allowed: &[&str]) {
        for (k, _) in t.t.iter() {
            if !allowed.contains(&k) {
                let at =
                    t.t.key(k)
                        .and_then(|k| k.span())
                        .map(|s| s.start)
                        .unwrap_or(t.at);
                let h = hint(k, allowed);
                self.error(at, format!("unknown key {k:?} in {name}{h}"));
            }
        }
    }

    /// The item under `key`, with the start of its value (or of its key) and the key's position.
    fn item<'d>(
        &mut self,
        t: Tbl<'d>,
        key: &str,
        path: &str,
        need: Need,
        name: &str,
    ) -> Option<(&'d Item, usize)> {
        match t.t.get_key_value(key) {
            Some((k, item)) => {
                let at = item
                    .span()
                    .or_else(|| k.span())
                    .map(|s| s.start)
                    .unwrap_or(t.at);
                self.mark(&format!("{path}.{key}"), at);
                Some((item, at))
            }
            None => {
                if need == Required {
                    self.error(t.at, format!("missing required key {key:?} in {name}"));
                }
                None
            }
        }
    }

    fn wrong_type(&mut self, at: usize, key: &str, want: &str, item: &Item) {
        let found = match item {
            Item::Value(Value::String(_)) => "a string",
            Item::Value(Value::Integer(_)) => "an integer",
            Item::Value(Value::Float(_)) => "a decimal number",
            Item::Value(Value::Boolean(_)) => "true/false",
            Item::Value(Value::Datetime(_)) => "a date/time",
            Item::Value(Value::Array(_)) => "a list",
            Item::Value(Value::InlineTable(_)) | Item::Table(_) => "a table",
            Item::ArrayOfTables(_) => "a list of tables",
            Item::None => "nothing",
        };
        self.error(at, format!("{key:?} must be {want}, found {found}"));
    }

    fn string(&mut self, t: Tbl, key: &str, path: &str, need: Need, name: &str) -> Option<String> {
        let (item, at) = self.item(t, key, path, need, name)?;
        match item.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.wrong_type(at, key, "a string in quotes", item);
                None
            }
        }
    }

    /// A string that must not be empty or only spaces.
    fn text(&mut self, t: Tbl, key: &str, path: &str, need: Need, name: &str) -> Option<String> {
        let s = self.string(t, key, path, need, name)?;
        if s.trim().is_empty() {
            let at = self.spans.at(&format!("{path}.{key}"));
            self.error(at, format!("{key:?} must not be empty"));
            return None;
        }
        Some(s)
    }

    /// A site or agreement id: lowercase letters, digits, '-', '.', '_'.
    fn id(&mut self, t: Tbl, key: &str, path: &str, name: &str) -> Option<String> {
        let s = self.string(t, key, path, Required, name)?;
        if !is_id(&s) {
            let at = self.spans.at(&format!("{path}.{key}"));
            self.error(at, format!("{key:?} {s:?} is not a valid id: use 1-64 lowercase letters, digits, '-', '.' or '_', starting with a letter or digit"));
            return None;
        }
        Some(s)
    }

    #[allow(clippy::too_many_arguments)] // table, key, path, need, name in messages, range
    fn integer(
        &mut self,
        t: Tbl,
        key: &str,
        path: &str,
        need: Need,
        name: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let (item, at) = self.item(t, key, path, need, name)?;
        match item.as_integer() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.error(
                    at,
                    format!("{key:?} is {n}, but must be between {min} and {max}"),
                );
                None
            }
            None => {
                self.wrong_type(at, key, "a whole number", item);
                None
            }
        }
    }

    fn boolean(&mut self, t: Tbl, key: &str, path: &str, name: &str) -> Option<bool> {
        let (item, at) = self.item(t, key, path, Optional, name)?;
        match item.as_bool() {
            Some(b) => Some(b),
            None => {
                self.wrong_type(at, key, "true or false", item);
                None
            }
        }
    }

    fn date(&mut self, t: Tbl, key: &str, path: &str, need: Need, name: &str) -> Option<Date> {
        let (item, at) = self.item(t, key, path, need, name)?;
        let parsed = match item.as_value() {
            Some(Value::Datetime(d)) if d.value().time.is_none() && d.value().offset.is_none() => {
                d.value().date.and_then(|d| {
                    let month = Month::try_from(d.month).ok()?;
                    Date::from_calendar_date(i32::from(d.year), month, d.day).ok()
                })
            }
            Some(Value::String(s)) => Date::parse(
                s.value(),
                time::macros::format_description!("[year]-[month]-[day]"),
            )
            .ok(),
            _ => {
                self.wrong_type(at, key, "a date like 2026-01-31", item);
                return None;
            }
        };
        if parsed.is_none() {
            self.error(
                at,
                format!("{key:?} must be a calendar date like 2026-01-31 (no time of day)"),
            );
        }
        parsed
    }

    /// A list of strings, each with its position.
    fn strings(
        &mut self,
        t: Tbl,
        key: &str,
        path: &str,
        need: Need,
        name: &str,
    ) -> Option<Vec<(String, usize)>> {
        let (item, at) = self.item(t, key, path, need, name)?;
        let Some(arr) = item.as_array() else {
            self.wrong_type(at, key, "a list of strings like [\"a\", \"b\"]", item);
            return None;
        };
        let mut out = Vec::new();
        for (i, v) in arr.iter().enumerate() {
            let vat = v.span().map(|s| s.start).unwrap_or(at);
            self.mark(&format!("{path}.{key}[{i}]"), vat);
            match v.as_str() {
                Some(s) => out.push((s.to_string(), vat)),
                None => self.error(
                    vat,
                    format!("every entry of {key:?} must be a string in quotes"),
                ),
            }
        }
        Some(out)
    }

    /// A sub-table (`[x.key]` or `key = { ... }`).
    fn table<'d>(
        &mut self,
        t: Tbl<'d>,
        key: &str,
        path: &str,
        need: Need,
        name: &str,
    ) -> Option<Tbl<'d>> {
        let (item, at) = self.item(t, key, path, need, name)?;
        match item.as_table_like() {
            Some(sub) if !matches!(item, Item::ArrayOfTables(_)) => Some(Tbl { t: sub, at }),
            _ => {
                self.wrong_type(
                    at,
                    key,
                    &format!("a table ([{key}] or {key} = {{ ... }})"),
                    item,
                );
                None
            }
        }
    }

    /// A list of tables (`[[x.key]]` or `key = [{ ... }, ...]`).
    fn tables<'d>(
        &mut self,
        t: Tbl<'d>,
        key: &str,
        path: &str,
        need: Need,
        name: &str,
    ) -> Vec<Tbl<'d>> {
        let Some((item, at)) = self.item(t, key, path, need, name) else {
            return Vec::new();
        };
        match item {
            Item::ArrayOfTables(a) => a
                .iter()
                .map(|x| Tbl {
                    t: x,
                    at: x.span().map(|s| s.start).unwrap_or(at),
                })
                .collect(),
            Item::Value(Value::Array(a)) if a.iter().all(|v| v.as_inline_table().is_some()) => a
                .iter()
                .filter_map(|v| {
                    let it = v.as_inline_table()?;
                    Some(Tbl {
                        t: it,
                        at: v.span().map(|s| s.start).unwrap_or(at),
                    })
                })
                .collect(),
            _ => {
                self.wrong_type(at, key, &format!("a list of tables ([[{key}]])"), item);
                Vec::new()
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // table, key, path, need, name in messages, vocabulary
    fn choice<T: Copy>(
        &mut self,
        t: Tbl,
        key: &str,
        path: &str,
        need: Need,
        name: &str,
        all: &[T],
        name_of: fn(T) -> &'static str,
    ) -> Option<T> {
        let s = self.string(t, key, path, need, name)?;
        let found = all.iter().copied().find(|v| name_of(*v) == s);
        if found.is_none() {
            let names: Vec<&str> = all.iter().map(|v| name_of(*v)).collect();
            let at = self.spans.at(&format!("{path}.{key}"));
            let h = hint(&s, &names);
            self.error(at, format!("unknown {key} {s:?}{h}"));
        }
        found
    }
}

/// Reads an agreement from TOML text. `file` names it in messages.
pub fn read(file: &str, text: &str) -> Parsed {
    let mut r = Reader {
        file,
        text,
        errors: Vec::new(),
        spans: Spans::default(),
    };
    let doc = match ImDocument::parse(text) {
        Ok(d) => d,
        Err(e) => {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            let msg = e.message().trim().to_string();
            r.error(at, format!("TOML syntax error: {msg}"));
            return Parsed {
                agreement: None,
                errors: r.errors,
                spans: r.spans,
            };
        }
    };
    let root = Tbl {
        t: doc.as_table(),
        at: 0,
    };
    r.keys(root, "the file", &["agreement", "parties", "flows"]);
    let agreement = read_agreement(&mut r, root);
    Parsed {
        agreement: if r.errors.is_empty() { agreement } else { None },
        errors: r.errors,
        spans: r.spans,
    }
}

fn read_agreement(r: &mut Reader, root: Tbl) -> Option<Agreement> {
    let head = r.table(root, "agreement", "", Required, "the file");
    let mut a = Agreement {
        id: String::new(),
        version: 1,
        title: String::new(),
        status: Status::Draft,
        valid_from: Date::MIN,
        valid_until: Date::MIN,
        governing_law: String::new(),
        paper_reference: String::new(),
        parties: Vec::new(),
        flows: Vec::new(),
    };
    let mut ok = head.is_some();
    if let Some(h) = head {
        let n = "[agreement]";
        let p = ".agreement";
        r.keys(
            h,
            n,
            &[
                "id",
                "version",
                "title",
                "status",
                "valid_from",
                "valid_until",
                "governing_law",
                "paper_reference",
            ],
        );
        let id = r.id(h, "id", p, n);
        let version = r.integer(h, "version", p, Required, n, 1, i64::from(u32::MAX));
        let title = r.text(h, "title", p, Required, n);
        let status = r.choice(h, "status", p, Required, n, &Status::ALL, Status::name);
        let from = r.date(h, "valid_from", p, Required, n);
        let until = r.date(h, "valid_until", p, Required, n);
        let law = r.text(h, "governing_law", p, Required, n);
        let paper = r.string(h, "paper_reference", p, Optional, n);
        if let (Some(f), Some(u)) = (from, until) {
            if u < f {
                let at = r.spans.at(".agreement.valid_until");
                r.error(
                    at,
                    format!("valid_until {u} is before valid_from {f} (dates reversed)"),
                );
            }
        }
        match (id, version, title, status, from, until, law) {
            (Some(id), Some(v), Some(t), Some(s), Some(f), Some(u), Some(l)) => {
                a.id = id;
                a.version = v as u32;
                a.title = t;
                a.status = s;
                a.valid_from = f;
                a.valid_until = u;
                a.governing_law = l;
                a.paper_reference = paper.unwrap_or_default();
            }
            _ => ok = false,
        }
    }

    let parties = r.tables(root, "parties", "", Required, "the file");
    if parties.len() < 2 && r.errors.is_empty() {
        let at = parties.first().map(|t| t.at).unwrap_or(0);
        r.error(at, "an agreement needs at least two [[parties]]");
    }
    let mut sites: BTreeMap<String, usize> = BTreeMap::new();
    for (i, t) in parties.into_iter().enumerate() {
        let p = format!(".parties[{i}]");
        r.mark(&p, t.at);
        match read_party(r, t, &p) {
            Some(party) => {
                if let Some(first) = sites.get(&party.site) {
                    let at = r.spans.at(&format!("{p}.site"));
                    let line = Located::at("", r.text, *first, "").line;
                    r.error(
                        at,
                        format!(
                            "party {:?} is listed twice (first on line {line})",
                            party.site
                        ),
                    );
                } else {
                    sites.insert(party.site.clone(), r.spans.at(&format!("{p}.site")));
                }
                a.parties.push(party);
            }
            None => ok = false,
        }
    }

    let flows = r.tables(root, "flows", "", Optional, "the file");
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, t) in flows.into_iter().enumerate() {
        let p = format!(".flows[{i}]");
        r.mark(&p, t.at);
        match read_flow(r, t, &p) {
            Some(flow) => {
                if let Some(first) = names.get(&flow.name) {
                    let at = r.spans.at(&format!("{p}.name"));
                    let line = Located::at("", r.text, *first, "").line;
                    r.error(at, format!("duplicate flow {:?} (first defined on line {line}); flow names must be unique", flow.name));
                } else {
                    names.insert(flow.name.clone(), r.spans.at(&format!("{p}.name")));
                }
                a.flows.push(flow);
            }
            None => ok = false,
        }
    }
    ok.then_some(a)
}

fn read_party(r: &mut Reader, t: Tbl, p: &str) -> Option<Party> {
    let n = "[[parties]]";
    r.keys(
        t,
        n,
        &[
            "site",
            "organisation",
            "privacy_officer",
            "privacy_contact",
            "certificate_pin",
            "status",
        ],
    );
    let site = r.id(t, "site", p, n);
    let organisation = r.text(t, "organisation", p, Required, n);
    let officer = r.text(t, "privacy_officer", p, Required, n);
    let contact = r.text(t, "privacy_contact", p, Required, n);
    let pin = r.string(t, "certificate_pin", p, Optional, n);
    if let Some(pin) = &pin {
        if pin.len() != 64
            || !pin
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            let at = r.spans.at(&format!("{p}.certificate_pin"));
            r.error(at, "certificate_pin must be 64 lowercase hex digits: the SHA-256 of the site certificate's public key (SubjectPublicKeyInfo)");
        }
    }
    let status = if t.t.contains_key("status") {
        r.choice(
            t,
            "status",
            p,
            Optional,
            n,
            &PartyStatus::ALL,
            PartyStatus::name,
        )?
    } else {
        PartyStatus::Active
    };
    Some(Party {
        site: site?,
        organisation: organisation?,
        privacy_officer: officer?,
        privacy_contact: contact?,
        certificate_pin: pin,
        status,
    })
}

fn read_flow(r: &mut Reader, t: Tbl, p: &str) -> Option<Flow> {
    let n = "[[flows]]";
    r.keys(
        t,
        n,
        &[
            "name",
            "from",
            "to",
            "purposes",
            "select",
            "consent",
            "deid",
            "subject_ids",
            "retention",
            "studies_per_day",
            "results",
        ],
    );
    let name = r.id(t, "name", p, n);
    let from = r.id(t, "from", p, n);
    let to = r.id(t, "to", p, n);
    if let (Some(f), Some(to)) = (&from, &to) {
        if f == to {
            let at = r.spans.at(&format!("{p}.to"));
            r.error(
                at,
                format!(
                    "a flow must go between two different parties, but from and to are both {f:?}"
                ),
            );
        }
    }
    let mut purposes = BTreeSet::new();
    let mut ok = true;
    if let Some(list) = r.strings(t, "purposes", p, Required, n) {
        if list.is_empty() {
            let at = r.spans.at(&format!("{p}.purposes"));
            r.error(at, "a flow needs at least one purpose");
        }
        let names: Vec<&str> = Purpose::ALL.iter().map(|p| p.name()).collect();
        for (s, at) in list {
            match Purpose::parse(&s) {
                Some(pu) => {
                    if !purposes.insert(pu) {
                        r.error(at, format!("purpose {s:?} is listed twice"));
                    }
                }
                None => {
                    let h = hint(&s, &names);
                    r.error(at, format!("unknown purpose {s:?}{h}"));
                    ok = false;
                }
            }
        }
    } else {
        ok = false;
    }
    let select = match r.table(t, "select", p, Optional, n) {
        Some(s) => read_selector(r, s, &format!("{p}.select")),
        None => Some(Selector::default()),
    };
    let consent = match r.table(t, "consent", p, Optional, n) {
        Some(c) => read_consent(r, c, &format!("{p}.consent")),
        None => Some(Consent::default()),
    };
    let deid = match r.table(t, "deid", p, Optional, n) {
        Some(d) => read_deid(r, d, &format!("{p}.deid")),
        None => Some(DeidConfig::default()),
    };
    let subject_ids = match r.table(t, "subject_ids", p, Optional, n) {
        Some(s) => {
            let sp = format!("{p}.subject_ids");
            r.keys(s, "[flows.subject_ids]", &["mapping"]);
            Some(
                r.text(s, "mapping", &sp, Required, "[flows.subject_ids]")
                    .map(|mapping| SubjectIds { mapping }),
            )
        }
        None => None,
    };
    let retention = match r.table(t, "retention", p, Optional, n) {
        Some(s) => {
            let sp = format!("{p}.retention");
            let rn = "[flows.retention]";
            r.keys(s, rn, &["days", "after"]);
            let days = r.integer(s, "days", &sp, Required, rn, 1, 36_500);
            let after = r.choice(
                s,
                "after",
                &sp,
                Required,
                rn,
                &AfterRetention::ALL,
                AfterRetention::name,
            );
            match (days, after) {
                (Some(d), Some(a)) => Some(Some(Retention {
                    days: d as u32,
                    after: a,
                })),
                _ => None,
            }
        }
        None => Some(None),
    };
    let per_day = if t.t.contains_key("studies_per_day") {
        r.integer(t, "studies_per_day", p, Optional, n, 1, 10_000_000)
            .map(|v| Some(v as u32))
    } else {
        Some(None)
    };
    let results = match r.table(t, "results", p, Optional, n) {
        Some(s) => {
            let sp = format!("{p}.results");
            let rn = "[flows.results]";
            r.keys(s, rn, &["return_to_origin", "reidentify_by"]);
            let ret = r.boolean(s, "return_to_origin", &sp, rn).unwrap_or(false);
            let by = r
                .strings(s, "reidentify_by", &sp, Optional, rn)
                .unwrap_or_default();
            if !ret && !by.is_empty() {
                let at = r.spans.at(&format!("{sp}.reidentify_by"));
                r.error(at, "reidentify_by is set but return_to_origin is false: results cannot be re-identified if they may not return");
            }
            for (s, at) in &by {
                if s.trim().is_empty() {
                    r.error(*at, "reidentify_by entries must name a role, not be empty");
                }
            }
            Some(Results {
                return_to_origin: ret,
                reidentify_by: by.into_iter().map(|(s, _)| s).collect(),
            })
        }
        None => Some(Results::default()),
    };
    if !ok {
        return None;
    }
    Some(Flow {
        name: name?,
        from: from?,
        to: to?,
        purposes,
        select: select?,
        consent: consent?,
        deid: deid?,
        subject_ids: subject_ids.map_or(Some(None), |s| s.map(Some))?,
        retention: retention?,
        studies_per_day: per_day?,
        results: results?,
    })
}

fn read_selector(r: &mut Reader, t: Tbl, p: &str) -> Option<Selector> {
    let n = "[flows.select]";
    r.keys(
        t,
        n,
        &[
            "modalities",
            "body_parts",
            "study_date_from",
            "study_date_until",
            "description",
            "source_aes",
        ],
    );
    let mut ok = true;
    let mut sel = Selector::default();
    for (m, at) in r
        .strings(t, "modalities", p, Optional, n)
        .unwrap_or_default()
    {
        if MODALITIES.contains(&m.as_str()) {
            sel.modalities.insert(m);
        } else {
            let h = match suggest(&m, MODALITIES.iter().copied()) {
                Some(s) => format!("; did you mean {s:?}?"),
                None => " (see DICOM PS3.3 C.7.3.1.1.1 for the defined terms)".into(),
            };
            r.error(at, format!("unknown modality {m:?}{h}"));
            ok = false;
        }
    }
    for (b, at) in r
        .strings(t, "body_parts", p, Optional, n)
        .unwrap_or_default()
    {
        if b.is_empty()
            || b.len() > 16
            || !b
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_' || c == b' ')
        {
            r.error(at, format!("body part {b:?} must be a DICOM Body Part Examined code: up to 16 uppercase letters, digits, '_' (e.g. CHEST)"));
            ok = false;
        } else {
            sel.body_parts.insert(b);
        }
    }
    sel.study_date_from = r.date(t, "study_date_from", p, Optional, n);
    sel.study_date_until = r.date(t, "study_date_until", p, Optional, n);
    if let (Some(f), Some(u)) = (sel.study_date_from, sel.study_date_until) {
        if u < f {
            let at = r.spans.at(&format!("{p}.study_date_until"));
            r.error(
                at,
                format!("study_date_until {u} is before study_date_from {f} (dates reversed)"),
            );
        }
    }
    sel.description = r.text(t, "description", p, Optional, n);
    for (ae, at) in r
        .strings(t, "source_aes", p, Optional, n)
        .unwrap_or_default()
    {
        if ae.trim().is_empty() || ae.len() > 16 || ae.contains('\\') || !ae.is_ascii() {
            r.error(
                at,
                format!("source AE title {ae:?} must be 1-16 ASCII characters without '\\'"),
            );
            ok = false;
        } else {
            sel.source_aes.insert(ae);
        }
    }
    ok.then_some(sel)
}

fn read_consent(r: &mut Reader, t: Tbl, p: &str) -> Option<Consent> {
    let n = "[flows.consent]";
    r.keys(t, n, &["required", "recorded_in"]);
    let required = r.boolean(t, "required", p, n).unwrap_or(false);
    let recorded_in = r
        .string(t, "recorded_in", p, Optional, n)
        .unwrap_or_default();
    if required && recorded_in.trim().is_empty() {
        let at = r.spans.at(&format!("{p}.required"));
        r.error(
            at,
            "consent is required but recorded_in does not say where it is recorded",
        );
        return None;
    }
    Some(Consent {
        required,
        recorded_in,
    })
}

/// Resolves an attribute keyword (`PatientAge`) or tag (`(0010,1010)`, `00101010`).
fn attribute(s: &str) -> Result<(Tag, String), String> {
    let dict = StandardDataDictionary;
    let entry = if s.starts_with('(') || s.bytes().all(|b| b.is_ascii_hexdigit()) && s.len() == 8 {
        let tag = dict
            .parse_tag(s)
            .ok_or_else(|| format!("{s:?} is not a tag; write it as \"(0010,1010)\""))?;
        if tag.group() % 2 == 1 {
            return Err(format!("{s:?} is a private attribute; list private attributes under [[flows.deid.safe_private]]"));
        }
        dict.by_tag(tag)
    } else {
        dict.by_name(s)
    };
    match entry {
        Some(e) => match e.tag_range() {
            TagRange::Single(tag) => Ok((tag, e.alias().to_string())),
            _ => Err(format!(
                "{s:?} names a range of attributes; name one attribute"
            )),
        },
        None => {
            let lower = s.to_lowercase();
            let exact = known_keywords().find(|k| k.to_lowercase() == lower);
            let h = match exact.or_else(|| suggest(s, known_keywords())) {
                Some(k) => format!("; did you mean {k:?}?"),
                None => " (use the keyword from DICOM PS3.6, e.g. \"PatientAge\", or a tag like \"(0010,1010)\")".into(),
            };
            Err(format!("unknown DICOM attribute keyword {s:?}{h}"))
        }
    }
}

fn read_deid(r: &mut Reader, t: Tbl, p: &str) -> Option<DeidConfig> {
    let n = "[flows.deid]";
    r.keys(
        t,
        n,
        &[
            "profile",
            "options",
            "overrides",
            "safe_private",
            "pixel_clean",
            "burned_in_text",
        ],
    );
    let mut ok = true;
    if let Some(profile) = r.string(t, "profile", p, Optional, n) {
        if profile != "basic" {
            let at = r.spans.at(&format!("{p}.profile"));
            r.error(at, format!("unknown profile {profile:?}; the profile is \"basic\" (PS3.15 Basic Application Level Confidentiality Profile), changed by options"));
            ok = false;
        }
    }
    let mut cfg = DeidConfig::default();
    for (o, at) in r.strings(t, "options", p, Optional, n).unwrap_or_default() {
        match o.parse::<ProfileOption>() {
            Ok(opt) => {
                cfg.options.insert(opt);
            }
            Err(_) => {
                let names: Vec<&str> = ProfileOption::ALL.iter().map(|o| o.name()).collect();
                let h = hint(&o, &names);
                r.error(at, format!("unknown de-identification option {o:?}{h}"));
                ok = false;
            }
        }
    }
    if cfg
        .options
        .contains(&ProfileOption::RetainLongitudinalFullDates)
        && cfg
            .options
            .contains(&ProfileOption::RetainLongitudinalModifiedDates)
    {
        let at = r.spans.at(&format!("{p}.options"));
        r.error(at, "choose one of retain-longitudinal-full-dates and retain-longitudinal-modified-dates, not both");
        ok = false;
    }
    if let Some(mode) = r.string(t, "burned_in_text", p, Optional, n) {
        match mode.parse::<BurnedInTextMode>() {
            Ok(m) => cfg.burned_in_text = m,
            Err(_) => {
                let at = r.spans.at(&format!("{p}.burned_in_text"));
                let names: Vec<&str> = BurnedInTextMode::ALL.iter().map(|m| m.name()).collect();
                let h = hint(&mode, &names);
                r.error(at, format!("unknown burned-in text mode {mode:?}{h} (\"quarantine\" holds images at risk back; \"clean-pixel-data\" removes text found by OCR)"));
                ok = false;
            }
        }
    }
    let on = "[[flows.deid.overrides]]";
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, o) in r
        .tables(t, "overrides", p, Optional, n)
        .into_iter()
        .enumerate()
    {
        let op = format!("{p}.overrides[{i}]");
        r.mark(&op, o.at);
        r.keys(o, on, &["attribute", "action", "value", "justification"]);
        let attr = r.string(o, "attribute", &op, Required, on).and_then(|s| {
            let at = r.spans.at(&format!("{op}.attribute"));
            match attribute(&s) {
                Ok(v) => Some(v),
                Err(m) => {
                    r.error(at, m);
                    None
                }
            }
        });
        let action = r.string(o, "action", &op, Required, on);
        let value = r.string(o, "value", &op, Optional, on);
        let justification = r.text(o, "justification", &op, Required, on);
        let action = match (action.as_deref(), value) {
            (Some("fixed"), Some(v)) => Some(OverrideAction::Fixed(v)),
            (Some("fixed"), None) => {
                r.error(
                    o.at,
                    "action \"fixed\" needs a value = \"...\" to write in place of the attribute",
                );
                None
            }
            (Some(a @ ("keep" | "remove" | "token")), Some(_)) => {
                let at = r.spans.at(&format!("{op}.value"));
                r.error(
                    at,
                    format!("value is only allowed with action \"fixed\", not with {a:?}"),
                );
                None
            }
            (Some("keep"), None) => Some(OverrideAction::Keep),
            (Some("remove"), None) => Some(OverrideAction::Remove),
            (Some("token"), None) => Some(OverrideAction::Token),
            (Some(a), _) => {
                let at = r.spans.at(&format!("{op}.action"));
                let h = hint(a, &["keep", "remove", "token", "fixed"]);
                r.error(at, format!("unknown override action {a:?}{h}"));
                None
            }
            (None, _) => None,
        };
        match (attr, action, justification) {
            (Some((tag, keyword)), Some(action), Some(justification)) => {
                if let Some(first) = seen.get(&keyword) {
                    let at = r.spans.at(&format!("{op}.attribute"));
                    let line = Located::at("", r.text, *first, "").line;
                    r.error(at, format!("{keyword} already has an override on line {line}; one override per attribute"));
                    ok = false;
                } else {
                    seen.insert(keyword.clone(), r.spans.at(&format!("{op}.attribute")));
                }
                cfg.overrides.push(AttributeOverride {
                    tag,
                    keyword,
                    action,
                    justification,
                });
            }
            _ => ok = false,
        }
    }
    let sn = "[[flows.deid.safe_private]]";
    for (i, s) in r
        .tables(t, "safe_private", p, Optional, n)
        .into_iter()
        .enumerate()
    {
        let sp = format!("{p}.safe_private[{i}]");
        r.mark(&sp, s.at);
        r.keys(s, sn, &["group", "creator", "element"]);
        let group = r.integer(s, "group", &sp, Required, sn, 0x0009, 0xFFFF);
        if group.is_some_and(|g| g % 2 == 0) {
            let at = r.spans.at(&format!("{sp}.group"));
            r.error(at, "a private group number is odd (e.g. 0x0019)");
            ok = false;
        }
        let creator = r.text(s, "creator", &sp, Required, sn);
        let element = r.integer(s, "element", &sp, Required, sn, 0x10, 0xFF);
        match (group, creator, element) {
            (Some(g), Some(c), Some(e)) => cfg.safe_private.push(SafePrivate {
                group: g as u16,
                creator: c,
                element: e as u8,
            }),
            _ => ok = false,
        }
    }
    let pn = "[[flows.deid.pixel_clean]]";
    for (i, s) in r
        .tables(t, "pixel_clean", p, Optional, n)
        .into_iter()
        .enumerate()
    {
        let sp = format!("{p}.pixel_clean[{i}]");
        r.mark(&sp, s.at);
        r.keys(s, pn, &["modality", "manufacturer", "model", "rects"]);
        let modality = r.text(s, "modality", &sp, Optional, pn);
        let manufacturer = r.text(s, "manufacturer", &sp, Optional, pn);
        let model = r.text(s, "model", &sp, Optional, pn);
        let mut rects = Vec::new();
        if let Some((item, at)) = r.item(s, "rects", &sp, Required, pn) {
            let list = item.as_array().map(|a| a.iter().collect::<Vec<_>>());
            let parsed: Option<Vec<[u32; 4]>> = list.as_ref().and_then(|l| {
                l.iter()
                    .map(|v| {
                        let a = v.as_array()?;
                        let n: Vec<u32> = a
                            .iter()
                            .filter_map(|x| x.as_integer())
                            .filter_map(|x| u32::try_from(x).ok())
                            .collect();
                        (n.len() == 4 && a.len() == 4 && n[2] > 0 && n[3] > 0)
                            .then(|| [n[0], n[1], n[2], n[3]])
                    })
                    .collect()
            });
            match parsed {
                Some(v) if !v.is_empty() => rects = v,
                _ => {
                    r.error(at, "rects must be a list of [x, y, width, height] with whole numbers, width and height above 0, e.g. [[0, 0, 512, 40]]");
                    ok = false;
                }
            }
        }
        cfg.pixel_clean.push(PixelCleanRule {
            modality,
            manufacturer,
            model,
            rects,
        });
    }
    ok.then_some(cfg)
}
