//! Burned-in text: the gate that holds back images likely to carry text in their pixels, and the
//! Clean Pixel Data option that blanks agreed rectangles of uncompressed pixel data.
//!
//! Compressed (encapsulated) pixel data is never decoded here: an instance that would need
//! cleaning but is compressed is quarantined. Pixel data that needs no cleaning is moved through
//! untouched, byte for byte.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;

use super::{DeidError, PixelCleanRule};

/// Modalities whose images usually carry burned-in text (ultrasound, angiography, fluoroscopy,
/// endoscopy, photographs, "other" screenshots).
const RISKY_MODALITIES: &[&str] = &["US", "IVUS", "XA", "RF", "ES", "XC", "GM", "OT", "SC"];

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
}

fn number(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    let e = obj.get(tag)?;
    e.to_int::<u32>()
        .ok()
        .or_else(|| e.to_str().ok()?.trim().parse().ok())
}

/// Why this instance may carry burned-in text, or `None` when it is declared free of it or is not
/// a kind of image that usually carries it.
pub fn burned_in_risk(obj: &InMemDicomObject) -> Option<String> {
    match text(obj, tags::BURNED_IN_ANNOTATION).as_deref() {
        Some("YES") => return Some("BurnedInAnnotation is YES".into()),
        Some("NO") => return None,
        _ => {}
    }
    obj.get(tags::PIXEL_DATA)?;
    let modality = text(obj, tags::MODALITY)
        .unwrap_or_default()
        .to_ascii_uppercase();
    if RISKY_MODALITIES.contains(&modality.as_str()) {
        return Some(format!("{modality} image without BurnedInAnnotation NO"));
    }
    let class = text(obj, tags::SOP_CLASS_UID).unwrap_or_default();
    if class.starts_with("1.2.840.10008.5.1.4.1.1.7") {
        return Some("secondary capture image without BurnedInAnnotation NO".into());
    }
    let image_type = text(obj, tags::IMAGE_TYPE)
        .unwrap_or_default()
        .to_ascii_uppercase();
    if image_type.contains("SCREEN") || text(obj, tags::CONVERSION_TYPE).is_some() {
        return Some("screen capture without BurnedInAnnotation NO".into());
    }
    None
}

fn matches(rule: &PixelCleanRule, obj: &InMemDicomObject) -> bool {
    let eq = |want: &Option<String>, tag: Tag| match want {
        None => true,
        Some(w) => text(obj, tag).is_some_and(|v| v.eq_ignore_ascii_case(w.trim())),
    };
    eq(&rule.modality, tags::MODALITY)
        && eq(&rule.manufacturer, tags::MANUFACTURER)
        && eq(&rule.model, tags::MANUFACTURER_MODEL_NAME)
}

/// True when one of the flow's fixed-rectangle rules applies to this instance.
pub fn has_matching_rule(rules: &[PixelCleanRule], obj: &InMemDicomObject) -> bool {
    rules.iter().any(|r| matches(r, obj))
}

fn quarantine(reason: impl Into<String>) -> DeidError {
    DeidError::Quarantined {
        reason: reason.into(),
    }
}

/// Blanks (sets to zero) the rectangles of the first matching rule in every frame of native
/// pixel data. Returns the number of rectangles blanked. Refuses compressed pixel data, bit-packed
/// or chroma-subsampled layouts, and pixel data shorter than its attributes say.
pub fn clean_pixels(
    obj: &mut InMemDicomObject,
    rules: &[PixelCleanRule],
    risk: &str,
) -> Result<usize, DeidError> {
    let Some(rule) = rules.iter().find(|r| matches(r, obj)) else {
        return Err(quarantine(format!(
            "{risk}, and no pixel clean rule of the flow matches this modality and device"
        )));
    };
    let rows = number(obj, tags::ROWS)
        .ok_or_else(|| quarantine("pixel data without Rows; cannot clean"))?
        as usize;
    let cols = number(obj, tags::COLUMNS)
        .ok_or_else(|| quarantine("pixel data without Columns; cannot clean"))?
        as usize;
    let spp = number(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as usize;
    let bits = number(obj, tags::BITS_ALLOCATED).unwrap_or(0) as usize;
    let planar = number(obj, tags::PLANAR_CONFIGURATION).unwrap_or(0);
    let frames = number(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as usize;
    let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    if bits == 0 || !bits.is_multiple_of(8) || spp == 0 || spp > 4 {
        return Err(quarantine(
            "pixel layout (bits allocated / samples) cannot be cleaned",
        ));
    }
    if photometric.ends_with("_422") || photometric.ends_with("_420") {
        return Err(quarantine("chroma-subsampled pixel data cannot be cleaned"));
    }
    let bps = bits / 8;
    let frame_bytes = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(spp))
        .and_then(|n| n.checked_mul(bps))
        .ok_or_else(|| quarantine("pixel dimensions overflow"))?;
    let Some(elem) = obj.take(tags::PIXEL_DATA) else {
        return Err(quarantine("no pixel data to clean"));
    };
    let vr = elem.vr();
    let mut value = match elem.into_value() {
        Value::Primitive(p) => p,
        Value::PixelSequence(_) => {
            return Err(quarantine(format!(
                "{risk}: compressed (encapsulated) pixel data cannot be cleaned"
            )))
        }
        Value::Sequence(_) => {
            return Err(DeidError::Malformed {
                reason: "PixelData is a sequence".into(),
            })
        }
    };
    let (len_bytes, elem_size) =
        primitive_size(&value).ok_or_else(|| quarantine("pixel data of unexpected type"))?;
    if len_bytes < frame_bytes.saturating_mul(frames) {
        return Err(DeidError::Malformed {
            reason: "pixel data shorter than Rows x Columns x frames".into(),
        });
    }
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for f in 0..frames {
        for &[x, y, w, h] in &rule.rects {
            let (x0, y0) = ((x as usize).min(cols), (y as usize).min(rows));
            let (x1, y1) = (
                (x as usize).saturating_add(w as usize).min(cols),
                (y as usize).saturating_add(h as usize).min(rows),
            );
            for r in y0..y1 {
                if planar == 1 && spp > 1 {
                    for s in 0..spp {
                        let base = f * frame_bytes + s * rows * cols * bps + (r * cols) * bps;
                        ranges.push((base + x0 * bps, base + x1 * bps));
                    }
                } else {
                    let base = f * frame_bytes + r * cols * spp * bps;
                    ranges.push((base + x0 * spp * bps, base + x1 * spp * bps));
                }
            }
        }
    }
    zero_ranges(&mut value, &ranges, elem_size);
    obj.put(DataElement::new(tags::PIXEL_DATA, vr, value));
    obj.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"));
    Ok(rule.rects.len())
}

fn primitive_size(p: &PrimitiveValue) -> Option<(usize, usize)> {
    Some(match p {
        PrimitiveValue::U8(v) => (v.len(), 1),
        PrimitiveValue::U16(v) => (v.len() * 2, 2),
        PrimitiveValue::I16(v) => (v.len() * 2, 2),
        PrimitiveValue::U32(v) => (v.len() * 4, 4),
        PrimitiveValue::I32(v) => (v.len() * 4, 4),
        PrimitiveValue::F32(v) => (v.len() * 4, 4),
        PrimitiveValue::F64(v) => (v.len() * 8, 8),
        PrimitiveValue::U64(v) => (v.len() * 8, 8),
        PrimitiveValue::I64(v) => (v.len() * 8, 8),
        _ => return None,
    })
}

fn zero_ranges(p: &mut PrimitiveValue, ranges: &[(usize, usize)], size: usize) {
    fn zero<T: Copy + Default>(v: &mut [T], ranges: &[(usize, usize)], size: usize) {
        for &(s, e) in ranges {
            let (a, b) = (s / size, e.div_ceil(size).min(v.len()));
            if a < b {
                v[a..b].fill(T::default());
            }
        }
    }
    match p {
        PrimitiveValue::U8(v) => zero(v, ranges, size),
        PrimitiveValue::U16(v) => zero(v, ranges, size),
        PrimitiveValue::I16(v) => zero(v, ranges, size),
        PrimitiveValue::U32(v) => zero(v, ranges, size),
        PrimitiveValue::I32(v) => zero(v, ranges, size),
        PrimitiveValue::F32(v) => zero(v, ranges, size),
        PrimitiveValue::F64(v) => zero(v, ranges, size),
        PrimitiveValue::U64(v) => zero(v, ranges, size),
        PrimitiveValue::I64(v) => zero(v, ranges, size),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(modality: &str, pixels: Vec<u8>, cols: u16, rows: u16) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(tags::MODALITY, VR::CS, modality));
        o.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(rows),
        ));
        o.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(cols),
        ));
        o.put(DataElement::new(
            tags::SAMPLES_PER_PIXEL,
            VR::US,
            PrimitiveValue::from(1_u16),
        ));
        o.put(DataElement::new(
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(8_u16),
        ));
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(pixels),
        ));
        o
    }

    #[test]
    fn ultrasound_is_risky_unless_declared_clean() {
        let mut o = image("US", vec![1; 16], 4, 4);
        assert!(burned_in_risk(&o).is_some());
        o.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"));
        assert!(burned_in_risk(&o).is_none());
        let ct = image("CT", vec![1; 16], 4, 4);
        assert!(burned_in_risk(&ct).is_none());
    }

    #[test]
    fn blanks_only_the_rectangle() {
        let mut o = image("US", vec![9; 16], 4, 4);
        let rule = PixelCleanRule {
            modality: Some("US".into()),
            manufacturer: None,
            model: None,
            rects: vec![[1, 1, 2, 2]],
        };
        assert_eq!(clean_pixels(&mut o, &[rule], "US image").unwrap(), 1);
        let px = o
            .get(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .into_owned();
        assert_eq!(px, vec![9, 9, 9, 9, 9, 0, 0, 9, 9, 0, 0, 9, 9, 9, 9, 9]);
        assert_eq!(text(&o, tags::BURNED_IN_ANNOTATION).as_deref(), Some("NO"));
    }

    #[test]
    fn no_matching_rule_or_short_data_is_refused() {
        let mut o = image("US", vec![9; 16], 4, 4);
        let rule = PixelCleanRule {
            modality: Some("XA".into()),
            manufacturer: None,
            model: None,
            rects: vec![[0, 0, 1, 1]],
        };
        assert!(matches!(
            clean_pixels(&mut o, &[rule], "r"),
            Err(DeidError::Quarantined { .. })
        ));
        let mut short = image("US", vec![9; 3], 4, 4);
        let rule = PixelCleanRule {
            modality: None,
            manufacturer: None,
            model: None,
            rects: vec![[0, 0, 1, 1]],
        };
        assert!(matches!(
            clean_pixels(&mut short, &[rule], "r"),
            Err(DeidError::Malformed { .. })
        ));
    }
}
