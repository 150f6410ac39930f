//! The trial subject-ID mapping held at the origin: site patient ID -> trial subject ID.
//!
//! A flow with `[flows.subject_ids]` replaces the patient with the trial subject ID instead of a
//! keyed token. The mapping file (CSV, `patient_id,subject_id`, a header line allowed, `#`
//! comments) never leaves the origin; a patient who is not in it is not enrolled and must not be
//! sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Located;

/// A loaded subject-ID mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectIdMap {
    by_patient: BTreeMap<String, String>,
}

/// Why a mapping file cannot be used. Messages give line numbers, never patient IDs.
#[derive(Debug, thiserror::Error)]
pub enum SubjectIdError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<Located>),
    /// The agreement's token secret could not be had (shredded, or the key file unwritable).
    #[error(transparent)]
    Keys(#[from] crate::pseudonym::KeyError),
}

impl SubjectIdMap {
    /// Loads the mapping named by a flow, relative to the agreement file `agreement_path`.
    pub fn load_for(agreement_path: &Path, mapping: &str) -> Result<SubjectIdMap, SubjectIdError> {
        let path = agreement_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(mapping);
        let text = std::fs::read_to_string(&path).map_err(|source| SubjectIdError::Io {
            file: path.clone(),
            source,
        })?;
        SubjectIdMap::parse(&path.display().to_string(), &text)
    }

    /// Parses mapping text. Both columns must be unique: one subject per patient and back.
    pub fn parse(file: &str, text: &str) -> Result<SubjectIdMap, SubjectIdError> {
        let mut by_patient = BTreeMap::new();
        let mut subjects = BTreeMap::new();
        let mut offset = 0;
        for (n, line) in text.split_inclusive('\n').enumerate() {
            let at = offset;
            offset += line.len();
            let l = line.trim();
            if l.is_empty()
                || l.starts_with('#')
                || (n == 0 && l.eq_ignore_ascii_case("patient_id,subject_id"))
            {
                continue;
            }
            let bad = |m: &str| SubjectIdError::Invalid(Box::new(Located::at(file, text, at, m)));
            let (p, s) = l
                .split_once(',')
                .ok_or_else(|| bad("expected `patient_id,subject_id`"))?;
            let (p, s) = (p.trim(), s.trim());
            if p.is_empty() || s.is_empty() || s.contains(',') {
                return Err(bad("expected `patient_id,subject_id`, both non-empty"));
            }
            if by_patient.insert(p.to_string(), s.to_string()).is_some() {
                return Err(bad("this patient ID is mapped twice"));
            }
            if subjects.insert(s.to_string(), ()).is_some() {
                return Err(bad("this subject ID is given to two patients"));
            }
        }
        Ok(SubjectIdMap { by_patient })
    }

    /// The trial subject ID of a site patient ID; `None` means not enrolled: do not send.
    pub fn subject(&self, patient_id: &str) -> Option<&str> {
        self.by_patient.get(patient_id.trim()).map(String::as_str)
    }

    /// The mapping itself (site patient ID -> subject ID), for the de-identification engine.
    pub fn into_map(self) -> BTreeMap<String, String> {
        self.by_patient
    }

    pub fn len(&self) -> usize {
        self.by_patient.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_patient.is_empty()
    }
}

impl super::Flow {
    /// The de-identification settings that what arrives on this flow must satisfy (the
    /// receiver's release check): the flow's profile, and whether the patient is named by a
    /// trial subject ID instead of a token.
    pub fn release_config(&self) -> crate::deid::DeidConfig {
        crate::deid::DeidConfig {
            subject_ids: self.subject_ids.is_some(),
            ..self.deid.clone()
        }
    }

    /// The de-identification engine for this flow: its profile and options, the agreement's
    /// token namespace under the site keys, and for a trial flow (`[flows.subject_ids]`) the
    /// subject-ID mapping, loaded relative to the agreement file.
    pub fn deidentifier(
        &self,
        agreement_id: &str,
        agreement_path: &Path,
        keys: &crate::pseudonym::SiteKeys,
    ) -> Result<crate::deid::Deidentifier, SubjectIdError> {
        let d = crate::deid::Deidentifier::new(self.deid.clone(), keys.tokenizer(agreement_id)?);
        Ok(match &self.subject_ids {
            Some(s) => {
                d.with_subject_ids(SubjectIdMap::load_for(agreement_path, &s.mapping)?.into_map())
            }
            None => d,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_rejects_duplicates() {
        let m = SubjectIdMap::parse("m.csv", "patient_id,subject_id\n# c\nP1,T-001\nP2,T-002\n")
            .unwrap();
        assert_eq!(m.subject("P1"), Some("T-001"));
        assert_eq!(m.subject("P3"), None);
        let SubjectIdError::Invalid(e) =
            SubjectIdMap::parse("m.csv", "P1,T-001\nP2,T-001\n").unwrap_err()
        else {
            panic!()
        };
        assert_eq!(e.line, 2);
        assert!(!e.message.contains("P2"));
    }
}
