//! Recognizable visual features: the gate that holds back photographs and other images in which
//! the patient could be recognized (a face, a tattoo, a retina).
//!
//! PS3.15 treats them as it treats burned-in text: the Basic Profile does not remove them, and
//! an instance that has them must not leave unless they were cleaned (Clean Recognizable Visual
//! Features Option, E.3.2) or the agreement accepts them. pacs-broker cannot clean a face out
//! of pixels, so such an instance is quarantined, with a reason, unless the agreement keeps
//! Recognizable Visual Features (0028,0302) by an attribute override: the privacy officer's
//! explicit, justified decision (a consented dermatology or ophthalmology study, say).
//!
//! Owns: deciding whether an instance has recognizable visual features. Does not own: the
//! burned-in text gate and pixel cleaning ([`super::pixels`]), nor the quarantine itself.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;

use super::{DeidConfig, OverrideAction};

/// Photographic storage classes (PS3.4 Annex B): visible light photographs of the body
/// surface, the face or the eye, still or video. Endoscopic and microscopic images look inside
/// the body or at a slide and are not listed.
const PHOTOGRAPHIC_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.77.1.4", "VL Photographic Image"),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",
        "Video Photographic Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",
        "Ophthalmic Photography 8 Bit Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",
        "Ophthalmic Photography 16 Bit Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.5.5",
        "Wide Field Ophthalmic Photography Stereographic Projection Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.5.6",
        "Wide Field Ophthalmic Photography 3D Coordinates Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.7",
        "Dermoscopic Photography Image",
    ),
];

/// Modalities that are photographs whatever the storage class (a secondary capture of an
/// external camera picture, say).
const PHOTOGRAPHIC_MODALITIES: &[(&str, &str)] = &[
    ("XC", "external-camera photograph"),
    ("OP", "ophthalmic photograph"),
    ("DMS", "dermoscopic photograph"),
];

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_ascii_uppercase())
}

/// Why the patient could be recognized in this instance, or `None`: Recognizable Visual
/// Features YES, or a photograph (by storage class or modality) that does not say NO.
pub fn recognizable_features(obj: &InMemDicomObject) -> Option<String> {
    match text(obj, tags::RECOGNIZABLE_VISUAL_FEATURES).as_deref() {
        Some("YES") => {
            return Some(
                "RecognizableVisualFeatures is YES (the patient could be recognized)".into(),
            )
        }
        Some("NO") => return None,
        _ => {}
    }
    let class = text(obj, tags::SOP_CLASS_UID).unwrap_or_default();
    if let Some((_, name)) = PHOTOGRAPHIC_CLASSES.iter().find(|(uid, _)| *uid == class) {
        return Some(format!(
            "{name} without RecognizableVisualFeatures NO (a photograph may show the patient's face)"
        ));
    }
    let modality = text(obj, tags::MODALITY).unwrap_or_default();
    if obj.get(tags::PIXEL_DATA).is_some() {
        if let Some((_, what)) = PHOTOGRAPHIC_MODALITIES.iter().find(|(m, _)| *m == modality) {
            return Some(format!(
                "{what} without RecognizableVisualFeatures NO (it may show the patient's face)"
            ));
        }
    }
    None
}

/// True when the agreement accepts recognizable visual features: an attribute override that
/// keeps Recognizable Visual Features (0028,0302), with its justification.
pub fn accepted_by_agreement(config: &DeidConfig) -> bool {
    config
        .overrides
        .iter()
        .any(|o| o.tag == tags::RECOGNIZABLE_VISUAL_FEATURES && o.action == OverrideAction::Keep)
}

/// The quarantine reason for this instance under `config`, or `None` when it may leave.
pub fn gate(obj: &InMemDicomObject, config: &DeidConfig) -> Option<String> {
    let why = recognizable_features(obj)?;
    if accepted_by_agreement(config) {
        return None;
    }
    Some(format!(
        "{why}; pacs-broker cannot remove recognizable features from pixels, and the agreement \
         does not accept them (override RecognizableVisualFeatures keep)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deid::AttributeOverride;
    use dicom_core::{DataElement, PrimitiveValue, VR};

    fn obj(elems: &[(Tag, VR, &str)]) -> InMemDicomObject {
        InMemDicomObject::from_element_iter(
            elems
                .iter()
                .map(|(t, vr, v)| DataElement::new(*t, *vr, PrimitiveValue::from(*v))),
        )
    }

    #[test]
    fn photographs_and_declared_features_are_held_unless_accepted() {
        let photo = obj(&[(
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.77.1.4",
        )]);
        assert!(recognizable_features(&photo)
            .unwrap()
            .contains("VL Photographic"));
        let mut declared_no = photo.clone();
        declared_no.put(DataElement::new(
            tags::RECOGNIZABLE_VISUAL_FEATURES,
            VR::CS,
            "NO",
        ));
        assert_eq!(recognizable_features(&declared_no), None);
        let ct_face = obj(&[
            (tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2"),
            (tags::RECOGNIZABLE_VISUAL_FEATURES, VR::CS, "YES"),
        ]);
        let config = DeidConfig::default();
        assert!(gate(&ct_face, &config).unwrap().contains("YES"));
        let ct = obj(&[(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2")]);
        assert_eq!(gate(&ct, &config), None);
        let accepting = DeidConfig {
            overrides: vec![AttributeOverride {
                tag: tags::RECOGNIZABLE_VISUAL_FEATURES,
                keyword: "RecognizableVisualFeatures".into(),
                action: OverrideAction::Keep,
                justification: "consented dermatology photographs".into(),
            }],
            ..DeidConfig::default()
        };
        assert_eq!(gate(&ct_face, &accepting), None);
        assert_eq!(gate(&photo, &accepting), None);
    }
}
