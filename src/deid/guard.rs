//! A pre-parse guard against files that declare more than they hold.
//!
//! dicom-rs reserves each element's declared length before it reads the value, so a file of a
//! few kilobytes that declares a 3 GiB element makes the parser allocate 3 GiB (found by fuzzing
//! `fuzz/fuzz_targets/deid.rs`). On a node that parses what partners and modalities send, that is
//! a denial of service. [`check_declared_lengths`] walks the element headers (file meta, then the
//! data set in its transfer syntax, into sequences and items) without reading any value, and
//! refuses a file in which a defined length runs past the end of the file. It reads headers only
//! and always moves forward, so it is cheap and it ends.
//!
//! The same walk finds the file's layout ([`Layout`]): when the top-level Pixel Data is the last
//! element, [`read_guarded_split`] parses everything before it and leaves the pixel data in the
//! file, to be copied byte for byte into the output ([`PixelSource`]): it passes through
//! untouched without ever being read into memory.
//!
//! The DICOM listener holds most instances it receives in memory: [`read_guarded_split_memory`]
//! is the same guarded reader over bytes instead of a file (the same walk, the same checks, the
//! same parse, through a cursor); its [`PixelSource`] then names a range of those bytes.

use std::io::{Read, Seek, SeekFrom};

use dicom_core::dictionary::{DataDictionary, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// Explicit VRs with a 2-byte reserved field and a 4-byte length.
const EXPLICIT_LONG: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV",
];
/// Every VR with a 2-byte length. Anything else, including bytes that are no VR at all, has the
/// long form: the DICOM library reads an unknown VR as UN, so the guard must too, or the two
/// would disagree about where the next element starts.
const EXPLICIT_SHORT: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];
const UNDEFINED: u32 = 0xFFFF_FFFF;

fn u16_of(b: [u8; 2], little: bool) -> u16 {
    if little {
        u16::from_le_bytes(b)
    } else {
        u16::from_be_bytes(b)
    }
}

fn u32_of(b: [u8; 4], little: bool) -> u32 {
    if little {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    }
}

/// One element or item header: tag, explicit VR (if any), value length, header size.
struct Header {
    group: u16,
    element: u16,
    vr: Option<[u8; 2]>,
    len: u32,
    size: u64,
}

fn read_header<R: Read>(src: &mut R, explicit: bool, little: bool) -> std::io::Result<Header> {
    let mut t = [0u8; 4];
    src.read_exact(&mut t)?;
    let (group, element) = (u16_of([t[0], t[1]], little), u16_of([t[2], t[3]], little));
    let mut b4 = [0u8; 4];
    if group == 0xFFFE || !explicit {
        // Items and delimiters never carry a VR; implicit VR elements neither.
        src.read_exact(&mut b4)?;
        return Ok(Header {
            group,
            element,
            vr: None,
            len: u32_of(b4, little),
            size: 8,
        });
    }
    let mut vr = [0u8; 2];
    src.read_exact(&mut vr)?;
    let known = EXPLICIT_LONG.contains(&&vr) || EXPLICIT_SHORT.contains(&&vr);
    if !known {
        vr = *b"UN";
    }
    if !EXPLICIT_SHORT.contains(&&vr) {
        let mut reserved = [0u8; 2];
        src.read_exact(&mut reserved)?;
        src.read_exact(&mut b4)?;
        Ok(Header {
            group,
            element,
            vr: Some(vr),
            len: u32_of(b4, little),
            size: 12,
        })
    } else {
        let mut b2 = [0u8; 2];
        src.read_exact(&mut b2)?;
        Ok(Header {
            group,
            element,
            vr: Some(vr),
            len: u32::from(u16_of(b2, little)),
            size: 8,
        })
    }
}

/// True when the element is a sequence (by its explicit VR, or by the dictionary).
fn is_sequence(h: &Header) -> bool {
    match h.vr {
        Some(vr) => &vr == b"SQ",
        None => StandardDataDictionary
            .by_tag(Tag(h.group, h.element))
            .is_some_and(|e| matches!(e.vr, VirtualVr::Exact(VR::SQ))),
    }
}

/// Checks a DICOM Part 10 file's declared lengths ([`check_declared_lengths`], through a 64 KiB
/// buffer: the header walk reads the header region once and seeks past large values), then
/// parses it from the same open file: the parser never sees a file the guard refused. Errors
/// name the problem, never a value.
pub fn read_guarded(path: &std::path::Path) -> Result<dicom_object::DefaultDicomObject, String> {
    let (file, layout) = open_walked(path)?;
    parse(&file, &layout, false)
}

/// Pixel data left in its file: the byte range of the whole top-level Pixel Data element
/// (header and value, in the file's transfer syntax), to be copied verbatim into the output.
#[derive(Debug)]
pub struct PixelSource {
    input: Input,
    range: std::ops::Range<u64>,
    layout: Layout,
}

/// What a guarded read read from: an open file, or a whole Part 10 file held in memory.
#[derive(Debug)]
enum Input {
    File(std::fs::File),
    Memory(std::sync::Arc<Vec<u8>>),
}

impl PixelSource {
    /// The element's size in bytes, header included.
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the element's bytes into `to`. Between files this is a copy inside the kernel
    /// (`copy_file_range`, or shared extents on file systems that can), never through memory of
    /// ours. Fails if the input no longer holds them all.
    pub fn copy_to<W: std::io::Write + ?Sized>(&self, to: &mut W) -> Result<(), String> {
        let io = |e: std::io::Error| format!("cannot copy the pixel data: {}", e.kind());
        let mut f = match &self.input {
            Input::File(f) => f,
            Input::Memory(_) => {
                let bytes = self
                    .bytes()
                    .ok_or("cannot copy the pixel data: out of range")?;
                return to.write_all(bytes).map_err(io);
            }
        };
        f.seek(SeekFrom::Start(self.range.start)).map_err(io)?;
        let copied = std::io::copy(&mut f.take(self.len()), to).map_err(io)?;
        if copied != self.len() {
            return Err(
                "cannot copy the pixel data: the input file changed while it was read".into(),
            );
        }
        Ok(())
    }

    /// The element's bytes, when they are in memory ([`read_guarded_split_memory`]).
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.input {
            Input::File(_) => None,
            Input::Memory(m) => {
                let r = usize::try_from(self.range.start).ok()?
                    ..usize::try_from(self.range.end).ok()?;
                m.get(r)
            }
        }
    }

    /// Parses the whole file after all, pixel values included, from the same open file (for
    /// de-identification that must change pixels).
    pub fn parse_whole(self) -> Result<dicom_object::DefaultDicomObject, String> {
        match &self.input {
            Input::File(f) => parse(f, &self.layout, false),
            Input::Memory(m) => parse(std::io::Cursor::new(m.as_slice()), &self.layout, false),
        }
    }
}

/// Like [`read_guarded`], but when the file ends with its top-level Pixel Data the parser stops
/// before it and the pixel data stays in the file: the object gets an empty placeholder
/// element (so that every "has pixel data" check still holds) and the [`PixelSource`] says
/// where the bytes are. The parsed top-level tags must be exactly those the header walk saw
/// before Pixel Data; otherwise, or for any other layout, the whole file is parsed as
/// [`read_guarded`] does and no source is returned.
pub fn read_guarded_split(
    path: &std::path::Path,
) -> Result<(dicom_object::DefaultDicomObject, Option<PixelSource>), String> {
    let (file, layout) = open_walked(path)?;
    split(Input::File(file), layout)
}

/// [`read_guarded_split`] of a whole Part 10 file held in memory (the DICOM listener's
/// received instances): the same walk and checks, the same parse, from the bytes; the
/// [`PixelSource`] keeps `bytes` and names the range of its pixel data.
pub fn read_guarded_split_memory(
    bytes: std::sync::Arc<Vec<u8>>,
) -> Result<(dicom_object::DefaultDicomObject, Option<PixelSource>), String> {
    let layout = walk_tolerant(&mut std::io::Cursor::new(bytes.as_slice()))?;
    split(Input::Memory(bytes), layout)
}

/// The parse of [`read_guarded_split`] once the walk has found `layout`.
fn split(
    input: Input,
    layout: Layout,
) -> Result<(dicom_object::DefaultDicomObject, Option<PixelSource>), String> {
    let parse_input = |until| match &input {
        Input::File(f) => parse(f, &layout, until),
        Input::Memory(m) => parse(std::io::Cursor::new(m.as_slice()), &layout, until),
    };
    // Only VRs the encoder would write unchanged: encapsulated pixel data is always written
    // as OB, so a file that says OW for it is parsed whole and corrected; anything else (UN,
    // say) takes the ordinary path too, where the engine sees the value.
    let vr = match layout.pixel_data_vr {
        None => Some(VR::OW),
        Some(vr) if &vr == b"OB" => Some(VR::OB),
        Some(vr) if &vr == b"OW" && !layout.pixel_data_encapsulated => Some(VR::OW),
        Some(_) => None,
    };
    if let (Some(range), Some(vr)) = (layout.pixel_data.clone(), vr) {
        let mut obj = parse_input(true)?;
        let parsed: Vec<Tag> = obj.tags().collect();
        if parsed == layout.before_pixel_data
            && !parsed.contains(&dicom_dictionary_std::tags::PIXEL_DATA)
        {
            obj.put(pixel_placeholder(vr));
            return Ok((
                obj,
                Some(PixelSource {
                    input,
                    range,
                    layout,
                }),
            ));
        }
    }
    parse_input(false).map(|obj| (obj, None))
}

/// The stand-in for pixel data left in its file: Pixel Data, with its VR, and no value.
fn pixel_placeholder(vr: VR) -> dicom_object::mem::InMemElement {
    dicom_core::DataElement::new(
        dicom_dictionary_std::tags::PIXEL_DATA,
        vr,
        dicom_core::PrimitiveValue::Empty,
    )
}

/// True when `obj` holds the placeholder of [`read_guarded_split`] (Pixel Data with no value).
pub fn has_pixel_placeholder(obj: &dicom_object::mem::InMemDicomObject) -> bool {
    obj.get(dicom_dictionary_std::tags::PIXEL_DATA)
        .is_some_and(|e| {
            matches!(
                e.value(),
                dicom_core::value::Value::Primitive(dicom_core::PrimitiveValue::Empty)
            )
        })
}

fn open_walked(path: &std::path::Path) -> Result<(std::fs::File, Layout), String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open the file: {}", e.kind()))?;
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
    let layout = walk_tolerant(&mut reader)?;
    Ok((reader.into_inner(), layout))
}

/// Parses the file from its start (the same open file the walk read, so both saw the same
/// bytes), optionally stopping before the top-level Pixel Data.
fn parse<R: Read + Seek>(
    mut file: R,
    layout: &Layout,
    until_pixel_data: bool,
) -> Result<dicom_object::DefaultDicomObject, String> {
    use dicom_object::file::ReadPreamble;
    if layout.storage != Storage::Part10 || layout.un_sequences {
        return parse_rewritten(file, layout);
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read the file: {}", e.kind()))?;
    let mut options = dicom_object::OpenFileOptions::new().read_preamble(if layout.magic_at == 0 {
        ReadPreamble::Never
    } else {
        ReadPreamble::Always
    });
    if until_pixel_data {
        options = options.read_until(dicom_dictionary_std::tags::PIXEL_DATA);
    }
    options.from_reader(file).map_err(|e| {
        let mut m = e.to_string();
        m.truncate(200);
        format!("not a readable DICOM Part 10 file: {m}")
    })
}

/// Reads a file the library cannot parse as it is: a bare data set (given a file meta group of
/// its own), a deflated data set (inflated and checked here, under a bound), or a data set with
/// CP-246 sequences (rewritten, then checked). The data set is read into memory; the object's
/// transfer syntax is the file's (deflated stays deflated; a bare data set gets the one it was
/// written in), so the output is a proper Part 10 file of the same encoding.
fn parse_rewritten<R: Read + Seek>(
    mut file: R,
    layout: &Layout,
) -> Result<dicom_object::DefaultDicomObject, String> {
    use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
    let io = |e: std::io::Error| format!("cannot read the file: {}", e.kind());
    let unreadable = |e: &dyn std::fmt::Display| {
        let mut m = e.to_string();
        m.truncate(200);
        format!("not a readable DICOM data set: {m}")
    };
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    let start = usize::try_from(layout.dataset_at)
        .ok()
        .filter(|&s| s <= bytes.len())
        .ok_or("the file changed while it was read")?;
    let meta = match layout.storage {
        Storage::Bare { .. } => None,
        _ => Some(
            dicom_object::FileMetaTable::from_reader(&bytes[layout.magic_at as usize..start])
                .map_err(|e| unreadable(&e))?,
        ),
    };
    let mut dataset = match layout.storage {
        Storage::Deflated => inflate_checked(&bytes[start..])?,
        _ => bytes.split_off(start),
    };
    if layout.un_sequences {
        dataset = super::transcode::rewrite_cp246(&dataset)?;
        check_dataset_lengths(&dataset, true, true)?;
    }
    let (file_ts, read_ts) = match (layout.storage, &meta) {
        (Storage::Bare { explicit: true }, _) => (EXPLICIT_VR_LE.to_string(), EXPLICIT_VR_LE),
        (Storage::Bare { explicit: false }, _) => (IMPLICIT_VR_LE.to_string(), IMPLICIT_VR_LE),
        (Storage::Deflated, _) => (DEFLATED_EXPLICIT_VR_LE.to_string(), EXPLICIT_VR_LE),
        (Storage::Part10, Some(m)) => {
            let ts = m
                .transfer_syntax()
                .trim_end_matches(['\0', ' '])
                .to_string();
            let read = if ts == DEFLATED_EXPLICIT_VR_LE {
                EXPLICIT_VR_LE
            } else {
                ""
            };
            (ts, read)
        }
        (Storage::Part10, None) => return Err("the file meta group is missing".into()),
    };
    let read_uid = if read_ts.is_empty() {
        file_ts.as_str()
    } else {
        read_ts
    };
    let ts = TransferSyntaxRegistry
        .get(read_uid)
        .ok_or_else(|| format!("unknown transfer syntax {read_uid}"))?;
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(&dataset[..], ts)
        .map_err(|e| unreadable(&e))?;
    let meta = match meta {
        Some(m) => m,
        None => bare_meta(&obj, &file_ts)?,
    };
    Ok(obj.with_exact_meta(meta))
}

/// A file meta group for a bare data set: its SOP class and instance, and the transfer syntax
/// it was written in. Without SOP Class or Instance UID it is no storage object.
fn bare_meta(
    obj: &dicom_object::InMemDicomObject,
    ts: &str,
) -> Result<dicom_object::FileMetaTable, String> {
    use dicom_dictionary_std::tags;
    let uid = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty())
    };
    let (Some(class), Some(instance)) = (uid(tags::SOP_CLASS_UID), uid(tags::SOP_INSTANCE_UID))
    else {
        return Err(
            "not a storage object: a data set without file meta group, SOP Class UID or SOP Instance UID".into(),
        );
    };
    dicom_object::FileMetaTableBuilder::new()
        .transfer_syntax(ts)
        .media_storage_sop_class_uid(class)
        .media_storage_sop_instance_uid(instance)
        .build()
        .map_err(|e| format!("cannot build a file meta group: {e}"))
}

/// A reader that knows its position, so that moving to a header near the current one is a
/// relative seek (which a `BufReader` serves from its buffer, without a system call).
struct Tracked<'a, R> {
    inner: &'a mut R,
    cur: u64,
}

impl<R: Read + Seek> Tracked<'_, R> {
    fn goto(&mut self, pos: u64) -> std::io::Result<()> {
        if pos != self.cur {
            self.inner.seek_relative(pos as i64 - self.cur as i64)?;
            self.cur = pos;
        }
        Ok(())
    }
}

impl<R: Read> Read for Tracked<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.cur += n as u64;
        Ok(n)
    }
}

/// Checks that no element or item of the file declares a defined length beyond the file's end.
/// The error names the tag and the sizes, never a value. Give it a buffered reader: it reads
/// element headers only, a few bytes each, mostly close together.
pub fn check_declared_lengths<R: Read + Seek>(src: &mut R) -> Result<(), String> {
    walk(src).map(|_| ())
}

/// What the header walk learnt of a file's layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Where the "DICM" marker is (128 with the preamble, 0 without).
    pub magic_at: u64,
    /// The top-level Pixel Data element, header included, when it is the data set's last
    /// element and runs to the end of the file, and the walk found the structure well nested.
    pub pixel_data: Option<std::ops::Range<u64>>,
    /// Its explicit VR (`None` in implicit VR).
    pub pixel_data_vr: Option<[u8; 2]>,
    /// True when it is encapsulated (a sequence of fragments of undefined length).
    pub pixel_data_encapsulated: bool,
    /// The tags of the top-level data set elements before it, in file order (file meta
    /// excluded): what a parser stopping at Pixel Data must have read, for a cross-check.
    pub before_pixel_data: Vec<Tag>,
    /// How the data set is stored.
    pub storage: Storage,
    /// Where the data set starts: after the file meta group, or 0 for a bare data set.
    pub dataset_at: u64,
    /// True when the data set holds sequences stored as UN of undefined length (CP-246), which
    /// are rewritten ([`super::transcode`]) before parsing. Only a tolerant walk sets it; the
    /// strict one refuses such files.
    pub un_sequences: bool,
}

/// How a file holds its data set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Storage {
    /// DICOM Part 10: preamble (or not), `DICM`, file meta group, data set.
    #[default]
    Part10,
    /// A bare data set in little endian, without preamble nor file meta group (ACR-NEMA-style
    /// files, common in old archives): implicit VR, or explicit VR when the first element has
    /// one, as dcmtk and pydicom guess.
    Bare { explicit: bool },
    /// Deflated Explicit VR Little Endian: the data set after the file meta group is a raw
    /// deflate stream, inflated (up to [`MAX_INFLATED`]) and checked before parsing.
    Deflated,
}

/// The largest data set a deflated file may inflate to: more is refused as a decompression bomb
/// (deflate compresses up to about 1000:1, so a 1 MB file could ask for a gigabyte).
pub const MAX_INFLATED: u64 = 512 << 20;

/// Transfer syntax UIDs the guard reads itself.
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// The header walk behind [`check_declared_lengths`], also reporting the file's [`Layout`].
///
/// Strict: it accepts only what the DICOM library can then parse from the file as it is, so it
/// refuses bare data sets and CP-246 sequences; a deflated data set is inflated (bounded) and
/// its lengths checked.
pub fn walk<R: Read + Seek>(src: &mut R) -> Result<Layout, String> {
    let layout = walk_with(src, false)?;
    if layout.storage == Storage::Deflated {
        let io = |e: std::io::Error| format!("cannot read the file: {}", e.kind());
        src.seek(SeekFrom::Start(layout.dataset_at)).map_err(io)?;
        inflate_checked(src)?;
    }
    Ok(layout)
}

/// The walk the guarded readers use: like [`walk`], but it also accepts what they read
/// themselves before the library parses it: bare data sets ([`Storage::Bare`]) and CP-246
/// sequences ([`Layout::un_sequences`]); deflated data sets are inflated and checked when parsed.
fn walk_tolerant<R: Read + Seek>(src: &mut R) -> Result<Layout, String> {
    walk_with(src, true)
}

fn walk_with<R: Read + Seek>(src: &mut R, tolerant: bool) -> Result<Layout, String> {
    let io = |e: std::io::Error| format!("cannot read the file: {}", e.kind());
    let total = src.seek(SeekFrom::End(0)).map_err(io)?;
    let src = &mut Tracked {
        inner: src,
        cur: total,
    };
    let mut pos = 0;
    for start in [128u64, 0] {
        let mut magic = [0u8; 4];
        if total >= start + 4 {
            src.goto(start).map_err(io)?;
            src.read_exact(&mut magic).map_err(io)?;
            if &magic == b"DICM" {
                pos = start + 4;
                break;
            }
        }
    }
    if pos == 0 {
        let explicit = match bare_dataset(src, total) {
            Some(explicit) if tolerant => explicit,
            _ => {
                return Err("not a DICOM file (no DICM marker, and not a bare little endian data set starting with group 0008)".into())
            }
        };
        let mut layout = walk_from(src, 0, total, false, explicit, true, tolerant)?;
        layout.storage = Storage::Bare { explicit };
        // The library cannot stop at the pixel data of a bare data set: no pass-through.
        layout.pixel_data = None;
        return Ok(layout);
    }
    let mut layout = walk_from(src, pos, total, true, true, true, tolerant)?;
    layout.magic_at = pos - 4;
    if layout.un_sequences || layout.storage != Storage::Part10 {
        layout.pixel_data = None;
    }
    Ok(layout)
}

/// Whether the file starts like a bare data set in little endian: an element of group 0008
/// (every composite object has SOP Class UID there), with an explicit VR or not.
fn bare_dataset<R: Read + Seek>(src: &mut Tracked<'_, R>, total: u64) -> Option<bool> {
    if total < 8 {
        return None;
    }
    src.goto(0).ok()?;
    let mut b = [0u8; 6];
    src.read_exact(&mut b).ok()?;
    let (group, element) = (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    );
    if group != 0x0008 || element > 0x0018 {
        return None;
    }
    let vr = [b[4], b[5]];
    Some(EXPLICIT_LONG.contains(&&vr) || EXPLICIT_SHORT.contains(&&vr))
}

/// Inflates a deflated data set (raw deflate, PS3.5 A.5), refusing more than [`MAX_INFLATED`]
/// bytes, and checks the declared lengths of the result (explicit VR little endian).
pub fn inflate_checked<R: Read>(deflated: R) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(deflated)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("the deflated data set cannot be inflated: {}", e.kind()))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(format!(
            "the deflated data set inflates to more than {} MiB: refused",
            MAX_INFLATED >> 20
        ));
    }
    check_dataset_lengths(&out, true, true)?;
    Ok(out)
}

/// Checks the declared lengths of a bare data set held in memory (no preamble, no file meta),
/// in the given encoding: what the parser may be given next, such as the items of a sequence
/// that arrived as UN. Same rules and messages as [`check_declared_lengths`].
pub fn check_dataset_lengths(bytes: &[u8], explicit: bool, little: bool) -> Result<(), String> {
    let mut cursor = std::io::Cursor::new(bytes);
    let src = &mut Tracked {
        inner: &mut cursor,
        cur: 0,
    };
    walk_from(src, 0, bytes.len() as u64, false, explicit, little, false).map(|_| ())
}

/// The walk itself, from `pos` to `total`: starting in the file meta group (explicit VR little
/// endian, whose transfer syntax then decides the rest) when `in_meta`, else in a data set
/// encoded as `explicit`/`little` say.
fn walk_from<R: Read + Seek>(
    src: &mut Tracked<'_, R>,
    mut pos: u64,
    total: u64,
    in_meta: bool,
    mut explicit: bool,
    mut little: bool,
    tolerant: bool,
) -> Result<Layout, String> {
    let io = |e: std::io::Error| format!("cannot read the file: {}", e.kind());
    let mut layout = Layout::default();
    // Open sequences, items and pixel sequences around the current position: the end of each
    // of defined length, `None` for undefined length (closed by a delimitation item).
    let mut open: Vec<Option<u64>> = Vec::new();
    // The top-level Pixel Data element's start, and its end once known.
    let mut pixel: Option<(u64, Option<u64>)> = None;
    let mut after_pixel = false;
    let mut irregular = false;
    let mut meta = in_meta;
    let mut syntax_known = false;
    // Where the group length (0002,0000) says the meta group ends, once read.
    let mut meta_end: Option<u64> = None;
    let mut in_fragments = false;
    let mut deflated = false;
    if !in_meta {
        layout.dataset_at = pos;
    }
    while pos < total {
        if meta && deflated && meta_end.is_some_and(|e| pos >= e) {
            // The rest is a deflate stream: inflated and checked when it is read.
            layout.storage = Storage::Deflated;
            layout.dataset_at = pos;
            return Ok(layout);
        }
        if total - pos < 8 {
            return Err("the file ends inside an element header".into());
        }
        src.goto(pos).map_err(io)?;
        let h = if meta {
            let h = read_header(src, true, true).map_err(io)?;
            if h.group != 0x0002 || meta_end.is_some_and(|e| pos >= e) {
                meta = false;
                // The parser bounds the meta group by its group length and needs the transfer
                // syntax; a file on which the two readings could differ is refused.
                if !syntax_known {
                    return Err("the file meta group has no transfer syntax (0002,0010)".into());
                }
                if meta_end.is_some_and(|e| e != pos) {
                    return Err(
                        "the file meta group length (0002,0000) disagrees with its elements".into(),
                    );
                }
                layout.dataset_at = pos;
                src.goto(pos).map_err(io)?;
                read_header(src, explicit, little).map_err(io)?
            } else {
                if h.element == 0x0000 && h.len == 4 && pos + 12 <= total {
                    let mut v = [0u8; 4];
                    src.read_exact(&mut v).map_err(io)?;
                    meta_end = Some(pos + 12 + u64::from(u32::from_le_bytes(v)));
                    src.goto(pos + h.size).map_err(io)?;
                }
                if h.element == 0x0010 && h.len <= 64 && pos + h.size + u64::from(h.len) <= total {
                    syntax_known = true;
                    let mut v = vec![0u8; h.len as usize];
                    src.read_exact(&mut v).map_err(io)?;
                    match String::from_utf8_lossy(&v).trim_end_matches(['\0', ' ']) {
                        "1.2.840.10008.1.2" => (explicit, little) = (false, true),
                        "1.2.840.10008.1.2.2" => (explicit, little) = (true, false),
                        // A deflated data set cannot be walked without inflating it: the
                        // meta group ends where its group length says, the stream follows.
                        DEFLATED_EXPLICIT_VR_LE => {
                            if meta_end.is_none() {
                                return Err("a deflated file without file meta group length (0002,0000) cannot be read safely".into());
                            }
                            deflated = true;
                        }
                        _ => (explicit, little) = (true, true),
                    }
                }
                h
            }
        } else {
            read_header(src, explicit, little).map_err(io)?
        };
        while open.last().is_some_and(|end| end.is_some_and(|e| pos >= e)) {
            open.pop();
        }
        let top_level = open.is_empty() && !meta;
        if top_level && h.group != 0xFFFE {
            if pixel.is_some() {
                after_pixel = true;
            } else if (h.group, h.element) == (0x7FE0, 0x0010) {
                pixel = Some((pos, None));
                layout.pixel_data_vr = h.vr;
                layout.pixel_data_encapsulated = h.len == UNDEFINED;
            } else {
                layout.before_pixel_data.push(Tag(h.group, h.element));
            }
        }
        if h.group == 0xFFFE && matches!(h.element, 0xE00D | 0xE0DD) {
            // A delimitation item closes the innermost open container of undefined length.
            if open.pop() != Some(None) {
                irregular = true;
            }
            if open.is_empty() {
                if let Some((_, end @ None)) = &mut pixel {
                    *end = Some(pos + h.size);
                }
            }
        } else if top_level && h.group == 0xFFFE {
            irregular = true;
        }
        // Named in errors only (formatting it for every element cost more than the walk).
        let tag = || format!("({:04X},{:04X})", h.group, h.element);
        if h.len == UNDEFINED {
            // A UN element of undefined length holds a sequence in implicit VR (CP-246). The
            // DICOM library reads such content as explicit VR and mistakes item tags for
            // lengths (fuzzing found 3.7 GB requests from a 674-byte file), and it cannot
            // de-identify these files anyway: refused, by name.
            if h.vr == Some(*b"UN") {
                // The guarded readers rewrite such sequences before parsing (little endian
                // only: the standard's implicit content is little endian): the rest of the
                // walk is done on the rewritten data set.
                if tolerant && little && !meta {
                    layout.un_sequences = true;
                    return Ok(layout);
                }
                return Err(format!(
                    "element {} is a sequence encoded as UN of undefined length (CP-246), which is not supported",
                    tag()
                ));
            }
            // A sequence or item of undefined length, or encapsulated pixel data: the content
            // follows as items; walk on. Undefined length outside a sequence means fragments.
            if h.group != 0xFFFE && !is_sequence(&h) {
                in_fragments = true;
            }
            open.push(None);
            pos += h.size;
            continue;
        }
        if h.group == 0xFFFE && h.element == 0xE0DD {
            in_fragments = false;
        }
        let end = pos + h.size + u64::from(h.len);
        if end > total {
            return Err(format!(
                "element {} declares {} bytes but only {} remain: truncated or malformed file",
                tag(),
                h.len,
                total - pos - h.size
            ));
        }
        let walk_into = if h.group == 0xFFFE {
            h.element == 0xE000 && !in_fragments
        } else {
            is_sequence(&h)
        };
        if top_level && pixel.is_some_and(|(start, _)| start == pos) {
            pixel = Some((pos, Some(end)));
            // Values have even lengths; an odd one is left to the parser to judge.
            irregular |= h.len % 2 == 1;
        }
        if walk_into {
            open.push(Some(end));
            pos += h.size;
        } else {
            pos = end;
        }
    }
    while open.last().is_some_and(|end| end.is_some_and(|e| pos >= e)) {
        open.pop();
    }
    if meta {
        layout.dataset_at = pos;
        if deflated {
            layout.storage = Storage::Deflated;
        }
    }
    if let Some((start, Some(end))) = pixel {
        if end == total && open.is_empty() && !after_pixel && !irregular {
            layout.pixel_data = Some(start..end);
        }
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn file(dataset: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 128];
        v.extend_from_slice(b"DICM");
        // (0002,0010) UI "1.2.840.10008.1.2.1" (explicit VR little endian), 20 bytes padded.
        v.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I', 20, 0]);
        v.extend_from_slice(b"1.2.840.10008.1.2.1\0");
        v.extend_from_slice(dataset);
        v
    }

    #[test]
    fn accepts_a_well_formed_file_and_refuses_an_oversized_length() {
        // (0010,0010) PN "DOE^J " then (7FE0,0010) OW 4 bytes.
        let mut ds = vec![0x10, 0x00, 0x10, 0x00, b'P', b'N', 6, 0];
        ds.extend_from_slice(b"DOE^J ");
        ds.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ]);
        assert_eq!(check_declared_lengths(&mut Cursor::new(file(&ds))), Ok(()));
        // The same pixel data declaring 3 GiB.
        let mut bad = ds.clone();
        let n = bad.len();
        bad[n - 8..n - 4].copy_from_slice(&0xC000_0000u32.to_le_bytes());
        let e = check_declared_lengths(&mut Cursor::new(file(&bad))).unwrap_err();
        assert!(e.contains("(7FE0,0010)") && e.contains("3221225472"), "{e}");
        assert!(!e.contains("DOE"), "{e}");
    }

    /// The listener's memory reader takes the same path as the file reader: the same object,
    /// the same pixel data left in place (here: a range of the bytes), the same refusal of a
    /// length beyond the end, and the whole object when asked.
    #[test]
    fn the_memory_reader_reads_and_refuses_what_the_file_reader_does() {
        use dicom_core::{DataElement, PrimitiveValue};
        use dicom_dictionary_std::tags;
        let mut obj = dicom_object::InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from("DOE^J"),
        ));
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3"),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![1u8, 2, 3, 4, 5, 6]),
        ));
        let obj = obj
            .with_meta(
                dicom_object::FileMetaTableBuilder::new()
                    .transfer_syntax(EXPLICIT_VR_LE)
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
                    .media_storage_sop_instance_uid("1.2.3"),
            )
            .unwrap();
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.dcm");
        std::fs::write(&path, &bytes).unwrap();

        let (from_file, file_pixels) = read_guarded_split(&path).unwrap();
        let (from_memory, memory_pixels) =
            read_guarded_split_memory(std::sync::Arc::new(bytes.clone())).unwrap();
        let tags_of = |o: &dicom_object::DefaultDicomObject| o.tags().collect::<Vec<_>>();
        assert_eq!(tags_of(&from_file), tags_of(&from_memory));
        assert!(has_pixel_placeholder(&from_memory));
        let name = |o: &dicom_object::DefaultDicomObject| {
            o.get(tags::PATIENT_NAME)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(name(&from_memory), "DOE^J");
        let (file_pixels, memory_pixels) = (file_pixels.unwrap(), memory_pixels.unwrap());
        assert_eq!(file_pixels.len(), memory_pixels.len());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        file_pixels.copy_to(&mut a).unwrap();
        memory_pixels.copy_to(&mut b).unwrap();
        assert_eq!(a, b);
        assert!(bytes.ends_with(memory_pixels.bytes().unwrap()));
        assert!(file_pixels.bytes().is_none());
        let whole = memory_pixels.parse_whole().unwrap();
        assert_eq!(
            whole
                .get(tags::PIXEL_DATA)
                .unwrap()
                .to_bytes()
                .unwrap()
                .as_ref(),
            &[1u8, 2, 3, 4, 5, 6]
        );

        // Pixel data declaring more than there is: refused alike, naming no value.
        let n = bytes.len();
        bytes[n - 10..n - 6].copy_from_slice(&0xC000_0000u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let from_file = read_guarded_split(&path).unwrap_err();
        let from_memory = read_guarded_split_memory(std::sync::Arc::new(bytes)).unwrap_err();
        assert_eq!(from_file, from_memory);
        assert!(from_memory.contains("(7FE0,0010)"), "{from_memory}");
        assert!(!from_memory.contains("DOE"), "{from_memory}");
    }

    /// (0008,1115) SQ undefined length { item undefined { (0008,1150) UI 2 bytes } } end.
    fn undefined_length_sequence() -> Vec<u8> {
        let mut ds = vec![
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        ds.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, b'U', b'I', 2, 0, b'1', 0]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        ds
    }

    #[test]
    fn walks_into_sequences_and_skips_fragments() {
        let mut ds = undefined_length_sequence();
        // Encapsulated pixel data: a fragment whose bytes look like a header with a huge length.
        ds.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 8, 0, 0, 0]);
        ds.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, b'O', b'B', 0, 0]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert_eq!(check_declared_lengths(&mut Cursor::new(file(&ds))), Ok(()));
        // A nested element that lies about its length is found inside the sequence.
        let mut bad = ds.clone();
        bad[26] = 0xF0;
        bad[27] = 0xFF;
        let e = check_declared_lengths(&mut Cursor::new(file(&bad))).unwrap_err();
        assert!(e.contains("(0008,1150)"), "{e}");
    }

    fn layout(ds: &[u8]) -> Layout {
        walk(&mut Cursor::new(file(ds))).unwrap()
    }

    /// Where the data set starts in [`file`]'s output: preamble, DICM, one meta element.
    const DS: u64 = 128 + 4 + 8 + 20;

    #[test]
    fn finds_the_top_level_pixel_data_only_when_it_ends_the_file() {
        let mut ds = vec![0x10, 0x00, 0x10, 0x00, b'P', b'N', 6, 0];
        ds.extend_from_slice(b"DOE^J ");
        ds.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ]);
        let l = layout(&ds);
        assert_eq!(l.magic_at, 128);
        assert_eq!(l.pixel_data, Some(DS + 14..DS + 30));
        assert_eq!(l.pixel_data_vr, Some(*b"OW"));
        assert_eq!(l.before_pixel_data, vec![Tag(0x0010, 0x0010)]);
        // Anything after it (here trailing padding) and the bytes are not passed through.
        let mut trailing = ds.clone();
        trailing.extend_from_slice(&[0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 0, 0, 0, 0]);
        assert_eq!(layout(&trailing).pixel_data, None);
    }

    #[test]
    fn pixel_data_inside_a_sequence_is_not_the_image() {
        // (0088,0200) IconImageSequence, defined length, one defined-length item holding
        // (7FE0,0010) OW 4 bytes, ending exactly at the end of the file.
        let pixel = [
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ];
        let mut ds = vec![0x88, 0x00, 0x00, 0x02, b'S', b'Q', 0, 0, 24, 0, 0, 0];
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 16, 0, 0, 0]);
        ds.extend_from_slice(&pixel);
        let l = layout(&ds);
        assert_eq!(l.pixel_data, None);
        assert_eq!(l.before_pixel_data, vec![Tag(0x0088, 0x0200)]);
        // The same icon followed by the real image: the image is found.
        ds.extend_from_slice(&pixel);
        assert_eq!(layout(&ds).pixel_data, Some(DS + 36..DS + 52));
    }

    #[test]
    fn encapsulated_pixel_data_ends_with_its_delimiter() {
        let mut ds = undefined_length_sequence();
        let start = DS + ds.len() as u64;
        ds.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 4, 0, 0, 0, 9, 9, 9, 9]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let l = layout(&ds);
        assert_eq!(l.pixel_data, Some(start..DS + ds.len() as u64));
        assert_eq!(l.before_pixel_data, vec![Tag(0x0008, 0x1115)]);
        // Without its delimiter the structure is unfinished: no pass-through.
        ds.truncate(ds.len() - 8);
        assert_eq!(layout(&ds).pixel_data, None);
    }

    #[test]
    fn bare_data_sets_are_read_only_by_the_tolerant_walk() {
        // (0008,0016) UI "1.2" in implicit VR little endian, then (0010,0010) "DOE^J ".
        let mut ds = vec![0x08, 0x00, 0x16, 0x00, 4, 0, 0, 0];
        ds.extend_from_slice(b"1.2\0");
        ds.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, 6, 0, 0, 0]);
        ds.extend_from_slice(b"DOE^J ");
        let e = walk(&mut Cursor::new(ds.clone())).unwrap_err();
        assert!(e.contains("no DICM marker"), "{e}");
        let l = walk_tolerant(&mut Cursor::new(ds.clone())).unwrap();
        assert_eq!(l.storage, Storage::Bare { explicit: false });
        assert_eq!(l.dataset_at, 0);
        // A bare data set that lies about a length is refused all the same.
        let mut bad = ds.clone();
        bad[16..20].copy_from_slice(&0xC000_0000u32.to_le_bytes());
        assert!(walk_tolerant(&mut Cursor::new(bad)).is_err());
        // Text is not a data set.
        assert!(walk_tolerant(&mut Cursor::new(b"This is a README file".to_vec())).is_err());
    }

    #[test]
    fn cp246_sequences_are_marked_by_the_tolerant_walk_and_refused_by_the_strict_one() {
        let mut ds = vec![
            0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        ds.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let e = walk(&mut Cursor::new(file(&ds))).unwrap_err();
        assert!(e.contains("CP-246"), "{e}");
        let l = walk_tolerant(&mut Cursor::new(file(&ds))).unwrap();
        assert!(l.un_sequences);
        assert_eq!(l.dataset_at, DS);
        assert_eq!(l.pixel_data, None);
    }
}
