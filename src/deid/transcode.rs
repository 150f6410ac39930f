//! Rewrites a data set that the DICOM library cannot read as it is into one it can, byte for
//! byte the same content: sequences stored as UN of undefined length (CP-246).
//!
//! When a file is converted from implicit to explicit VR by a tool that does not know a
//! sequence's tag (a private sequence, or a public one newer than its dictionary), the sequence
//! is written with VR UN and undefined length, and its items stay in implicit VR little endian
//! (PS3.5 6.2.2, CP-246). The DICOM library reads that content as explicit VR and mistakes item
//! tags for lengths (fuzzing found 3.7 GB requests from a 674-byte file), so the guard refuses
//! such files before parsing ([`super::guard`]). This module decodes them as the standard says:
//! every such element becomes an explicit SQ whose items are re-encoded in explicit VR little
//! endian (VRs from the dictionary, UN where the dictionary has none), and every sequence and
//! item is written with undefined length so that no length has to be recomputed. The result is
//! then checked by the guard like any file, and parsed.
//!
//! Owns: that rewrite, over bytes in memory, with every length checked against the buffer and
//! the nesting depth bounded. Does not own: deciding when it is needed (the guard's walk), nor
//! parsing the result.

use dicom_core::dictionary::{DataDictionary, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// Deeper nesting than this is refused (real objects nest a handful of levels).
const MAX_DEPTH: usize = 64;
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Explicit VRs whose header has the 4-byte length form.
const LONG_FORM: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV",
];
/// Explicit VRs whose header has the 2-byte length form.
const SHORT_FORM: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];

struct Rewrite<'a> {
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
}

fn malformed(what: &str, at: usize) -> String {
    format!("malformed CP-246 sequence content: {what} at byte {at} of the data set")
}

impl Rewrite<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.src.len())
            .ok_or_else(|| malformed("a value runs past the end", self.pos))?;
        let s = &self.src[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn header(&mut self, tag: Tag, vr: &[u8; 2], len: u32) {
        self.out.extend_from_slice(&tag.group().to_le_bytes());
        self.out.extend_from_slice(&tag.element().to_le_bytes());
        self.out.extend_from_slice(vr);
        if SHORT_FORM.contains(&vr) {
            self.out.extend_from_slice(&(len as u16).to_le_bytes());
        } else {
            self.out.extend_from_slice(&[0, 0]);
            self.out.extend_from_slice(&len.to_le_bytes());
        }
    }

    fn marker(&mut self, element: u16, len: u32) {
        self.out.extend_from_slice(&0xFFFEu16.to_le_bytes());
        self.out.extend_from_slice(&element.to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
    }

    fn copy(&mut self, n: usize) -> Result<(), String> {
        let start = self.pos;
        self.take(n)?;
        self.out.extend_from_slice(&self.src[start..self.pos]);
        Ok(())
    }

    /// The elements of a data set (the top level, or an item) up to `end` (defined length) or
    /// up to and including its item delimiter (undefined length).
    fn dataset(&mut self, end: Option<usize>, explicit: bool, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(malformed("sequences nested too deeply", self.pos));
        }
        loop {
            match end {
                Some(e) if self.pos >= e => {
                    return if self.pos == e {
                        Ok(())
                    } else {
                        Err(malformed("an element runs past its item", self.pos))
                    };
                }
                None if depth == 0 && self.pos >= self.src.len() => return Ok(()),
                _ => {}
            }
            let at = self.pos;
            let tag = Tag(self.u16()?, self.u16()?);
            if tag.group() == 0xFFFE {
                let _len = self.u32()?;
                if tag.element() == 0xE00D && end.is_none() && depth > 0 {
                    return Ok(());
                }
                return Err(malformed("an item tag where an element was expected", at));
            }
            if explicit {
                self.explicit_element(tag, depth)?;
            } else {
                self.implicit_element(tag, depth)?;
            }
        }
    }

    fn explicit_element(&mut self, tag: Tag, depth: usize) -> Result<(), String> {
        let at = self.pos - 4;
        let vr_bytes = self.take(2)?;
        let vr = [vr_bytes[0], vr_bytes[1]];
        let long = !SHORT_FORM.contains(&&vr);
        let len = if long {
            self.take(2)?;
            self.u32()?
        } else {
            u32::from(self.u16()?)
        };
        if &vr == b"SQ" || (&vr == b"UN" && len == UNDEFINED) {
            // An explicit sequence, or a CP-246 one whose items are implicit VR.
            let items_explicit = &vr == b"SQ";
            self.header(tag, b"SQ", UNDEFINED);
            return self.items(len, items_explicit, depth);
        }
        // Copy the header as it was, then the value.
        self.out.extend_from_slice(&self.src[at..self.pos]);
        if len == UNDEFINED {
            // Encapsulated pixel data (or another fragment sequence): copied as it is.
            return self.fragments();
        }
        self.copy(len as usize)
    }

    fn implicit_element(&mut self, tag: Tag, depth: usize) -> Result<(), String> {
        let len = self.u32()?;
        let vr = dictionary_vr(tag);
        if len == UNDEFINED || vr == VR::SQ {
            self.header(tag, b"SQ", UNDEFINED);
            return self.items(len, false, depth);
        }
        let mut name = vr.to_bytes();
        if SHORT_FORM.contains(&&name) && len > u32::from(u16::MAX) {
            name = *b"UN";
        }
        if !SHORT_FORM.contains(&&name) && !LONG_FORM.contains(&&name) {
            name = *b"UN";
        }
        self.header(tag, &name, len);
        self.copy(len as usize)
    }

    /// The items of a sequence of length `len`, each rewritten with undefined length, and the
    /// sequence delimiter.
    fn items(&mut self, len: u32, explicit: bool, depth: usize) -> Result<(), String> {
        let end = if len == UNDEFINED {
            None
        } else {
            let e = self
                .pos
                .checked_add(len as usize)
                .filter(|&e| e <= self.src.len())
                .ok_or_else(|| malformed("a sequence runs past the end", self.pos))?;
            Some(e)
        };
        loop {
            if end.is_some_and(|e| self.pos >= e) {
                break;
            }
            let at = self.pos;
            let tag = Tag(self.u16()?, self.u16()?);
            let item_len = self.u32()?;
            match (tag.group(), tag.element()) {
                (0xFFFE, 0xE000) => {
                    self.marker(0xE000, UNDEFINED);
                    let item_end = if item_len == UNDEFINED {
                        None
                    } else {
                        Some(
                            self.pos
                                .checked_add(item_len as usize)
                                .filter(|&e| e <= self.src.len())
                                .ok_or_else(|| malformed("an item runs past the end", at))?,
                        )
                    };
                    self.dataset(item_end, explicit, depth + 1)?;
                    self.marker(0xE00D, 0);
                }
                (0xFFFE, 0xE0DD) if end.is_none() => break,
                _ => return Err(malformed("no item where an item was expected", at)),
            }
        }
        if end.is_some_and(|e| self.pos != e) {
            return Err(malformed("an item runs past its sequence", self.pos));
        }
        self.marker(0xE0DD, 0);
        Ok(())
    }

    /// Fragments of encapsulated data, up to and including the sequence delimiter.
    fn fragments(&mut self) -> Result<(), String> {
        loop {
            let at = self.pos;
            let (g, e) = (self.u16()?, self.u16()?);
            let len = self.u32()?;
            self.out.extend_from_slice(&self.src[at..self.pos]);
            match (g, e) {
                (0xFFFE, 0xE0DD) => return Ok(()),
                (0xFFFE, 0xE000) if len != UNDEFINED => self.copy(len as usize)?,
                _ => return Err(malformed("no fragment where a fragment was expected", at)),
            }
        }
    }
}

/// The dictionary VR of a tag read in implicit VR: UN for private and unknown tags and for
/// tags whose VR depends on context; UL for group lengths.
fn dictionary_vr(tag: Tag) -> VR {
    if tag.element() == 0 {
        return VR::UL;
    }
    if tag.group() % 2 == 1 {
        return VR::UN;
    }
    match StandardDataDictionary.by_tag(tag).map(|e| e.vr) {
        Some(VirtualVr::Exact(vr)) => vr,
        _ => VR::UN,
    }
}

/// Rewrites an explicit VR little endian data set (no file meta) so that every sequence stored
/// as UN of undefined length becomes an explicit SQ (see the module doc). Everything else is
/// kept, except that sequences and items get undefined lengths.
pub fn rewrite_cp246(dataset: &[u8]) -> Result<Vec<u8>, String> {
    let mut r = Rewrite {
        src: dataset,
        pos: 0,
        out: Vec::with_capacity(dataset.len() + dataset.len() / 8),
    };
    r.dataset(None, true, 0)?;
    Ok(r.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (0009,1010) UN undefined { item undefined { (0008,1150) UI "1.2" ; (0010,0010) PN
    /// "DOE" } } end, then (0010,0020) LO "ID".
    fn cp246() -> Vec<u8> {
        let mut v = vec![
            0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        v.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        v.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, 4, 0, 0, 0]);
        v.extend_from_slice(b"1.2\0");
        v.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, 4, 0, 0, 0]);
        v.extend_from_slice(b"DOE ");
        v.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        v.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        v.extend_from_slice(&[0x10, 0x00, 0x20, 0x00, b'L', b'O', 2, 0, b'I', b'D']);
        v
    }

    #[test]
    fn un_sequence_items_become_explicit() {
        let out = rewrite_cp246(&cp246()).unwrap();
        let mut want = vec![
            0x09, 0x00, 0x10, 0x10, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        want.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        want.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, b'U', b'I', 4, 0]);
        want.extend_from_slice(b"1.2\0");
        want.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, b'P', b'N', 4, 0]);
        want.extend_from_slice(b"DOE ");
        want.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0x10, 0x00, 0x20, 0x00, b'L', b'O', 2, 0, b'I', b'D']);
        assert_eq!(out, want);
    }

    #[test]
    fn lengths_past_the_end_and_deep_nesting_are_refused() {
        let mut bomb = cp246();
        // The UI element inside the item declares 3 GiB.
        bomb[24..28].copy_from_slice(&0xC000_0000u32.to_le_bytes());
        let e = rewrite_cp246(&bomb).unwrap_err();
        assert!(e.contains("runs past the end"), "{e}");
        let mut deep = vec![
            0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        deep.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        for _ in 0..100 {
            // Implicit VR inside: a private tag of undefined length is a sequence.
            deep.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, 0xFF, 0xFF, 0xFF, 0xFF]);
            deep.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        let e = rewrite_cp246(&deep).unwrap_err();
        assert!(e.contains("nested too deeply"), "{e}");
        // Truncated in the middle of the sequence.
        let cut = cp246()[..30].to_vec();
        assert!(rewrite_cp246(&cut).is_err());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes, alone or as the content of a UN sequence of undefined length: the
        /// rewrite ends without panicking, and what it returns is at most a small multiple of
        /// its input (every header grows by at most 4 bytes, every item by a delimiter).
        #[test]
        fn any_bytes_are_rewritten_or_refused(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut un = vec![0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
            un.extend_from_slice(&body);
            for input in [body.clone(), un] {
                if let Ok(out) = rewrite_cp246(&input) {
                    prop_assert!(out.len() <= 3 * input.len() + 16);
                }
            }
        }
    }
}
