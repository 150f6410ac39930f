//! Burned-in text found and removed with OCR: the `clean-pixel-data` mode of an agreement's
//! `burned_in_text` setting.
//!
//! Owns: the OCR engine (Tesseract through its command line, its program overridable with
//! `PACS_BROKER_TESSERACT`), turning native pixel data into 8-bit grey pictures for it, blacking
//! out the text boxes it finds in every frame and sample, the second OCR pass that decides
//! release, and the evidence of all that for the audit entry ([`OcrEvidence`]).
//!
//! Does not own: which images are at risk (that is [`super::pixels::burned_in_risk`]), the
//! fixed-rectangle masks of the Clean Pixel Data option (also [`super::pixels`]), faces
//! (recognisable visual features are held back whatever OCR says), nor quarantine storage.
//!
//! Fail-closed rules, and why:
//! - an image is released only when a second OCR pass over the cleaned pixels finds nothing
//!   readable; OCR that is missing, fails or times out means quarantine, never release;
//! - an image that declares burned-in text (BurnedInAnnotation YES) but where OCR finds none is
//!   held back: the declaration is evidence that text is there in a form OCR cannot read;
//! - compressed (encapsulated) pixel data is decoded with dicom-rs's codec where one exists
//!   (JPEG baseline/extended, RLE lossless), cleaned, and written uncompressed (a second lossy
//!   generation would degrade the image again); a lossy original keeps LossyImageCompression 01
//!   and its method, and the evidence says so. Without a codec, or big-endian, it is held back;
//! - the text OCR reads may be PHI: it is dropped as soon as each word is parsed and never
//!   reaches a log, a message or the evidence, which holds counts and boxes only.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;

use super::DeidError;

/// The environment variable naming the Tesseract program (default `tesseract` on the `PATH`).
pub const TESSERACT_ENV: &str = "PACS_BROKER_TESSERACT";

/// The mode name shown in evidence and agreements.
pub const MODE_NAME: &str = "clean-pixel-data";

/// What a flow does with images at risk of burned-in text (`[flows.deid] burned_in_text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum BurnedInTextMode {
    /// Held back (quarantined) unless a fixed-rectangle pixel clean rule of the Clean Pixel Data
    /// option cleans it. The default.
    #[default]
    Quarantine,
    /// Text found with OCR is blacked out; released only if OCR then reads nothing.
    CleanPixelData,
}

impl BurnedInTextMode {
    pub const ALL: [BurnedInTextMode; 2] = [
        BurnedInTextMode::Quarantine,
        BurnedInTextMode::CleanPixelData,
    ];

    /// The name used in agreements and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BurnedInTextMode::Quarantine => "quarantine",
            BurnedInTextMode::CleanPixelData => MODE_NAME,
        }
    }
}

impl std::fmt::Display for BurnedInTextMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BurnedInTextMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BurnedInTextMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown burned-in text mode `{s}`; known: quarantine, clean-pixel-data")
            })
    }
}

/// Why OCR could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OcrError {
    #[error("OCR is not available: cannot run `{program}` ({reason})")]
    Unavailable { program: String, reason: String },
    #[error("OCR failed: `{program}` exited with {status}")]
    Failed { program: String, status: String },
    #[error("OCR took longer than {0} s and was stopped")]
    TimedOut(u64),
}

/// The OCR engine: the Tesseract command line with English data.
#[derive(Debug, Clone)]
pub struct OcrEngine {
    program: PathBuf,
    version: Arc<OnceLock<Result<String, OcrError>>>,
}

/// Longest one OCR run may take before the image is held back instead.
const OCR_TIMEOUT: Duration = Duration::from_secs(120);

impl Default for OcrEngine {
    fn default() -> Self {
        OcrEngine::from_env()
    }
}

impl OcrEngine {
    /// Tesseract at `program` (a path, or a name looked up on the `PATH`).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        OcrEngine {
            program: program.into(),
            version: Arc::new(OnceLock::new()),
        }
    }

    /// Tesseract named by `PACS_BROKER_TESSERACT`, else `tesseract` on the `PATH`.
    pub fn from_env() -> Self {
        let program = std::env::var_os(TESSERACT_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("tesseract"));
        OcrEngine::new(program)
    }

    fn program_name(&self) -> String {
        self.program.display().to_string()
    }

    /// The engine's version line, e.g. `tesseract 5.3.0`; an error when it cannot run.
    pub fn version(&self) -> Result<String, OcrError> {
        self.version
            .get_or_init(|| {
                let out = Command::new(&self.program)
                    .arg("--version")
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .map_err(|e| OcrError::Unavailable {
                        program: self.program_name(),
                        reason: e.kind().to_string(),
                    })?;
                let first = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                if !out.status.success() || !first.starts_with("tesseract") {
                    return Err(OcrError::Unavailable {
                        program: self.program_name(),
                        reason: "it does not answer `--version` as Tesseract".into(),
                    });
                }
                Ok(first)
            })
            .clone()
    }

    /// The words Tesseract finds in `image` (boxes and confidences; the text is dropped).
    pub fn words(&self, image: &GreyImage) -> Result<Vec<Word>, OcrError> {
        let mut child = Command::new(&self.program)
            .args(["stdin", "stdout", "-l", "eng", "--psm", "3", "tsv"])
            // One thread per run: the batch already runs one worker per core.
            .env("OMP_THREAD_LIMIT", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| OcrError::Unavailable {
                program: self.program_name(),
                reason: e.kind().to_string(),
            })?;
        let pgm = image.to_pgm();
        let mut stdin = child.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || stdin.write_all(&pgm));
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            stdout.read_to_end(&mut s).map(|_| s)
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > OCR_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(OcrError::TimedOut(OCR_TIMEOUT.as_secs()));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    return Err(OcrError::Failed {
                        program: self.program_name(),
                        status: e.kind().to_string(),
                    })
                }
            }
        };
        let _ = writer.join();
        let out = reader.join().ok().and_then(Result::ok).unwrap_or_default();
        if !status.success() {
            return Err(OcrError::Failed {
                program: self.program_name(),
                status: status.to_string(),
            });
        }
        Ok(parse_tsv(&String::from_utf8_lossy(&out)))
    }
}

/// One word Tesseract found: its box in the picture, its confidence (0-100), and whether its
/// text holds a letter or digit. The text itself is not kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Word {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
    pub confidence: f32,
    pub alphanumeric: bool,
}

/// Word rows (level 5) of Tesseract's TSV output.
fn parse_tsv(tsv: &str) -> Vec<Word> {
    tsv.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.splitn(12, '\t').collect();
            if f.len() < 12 || f[0] != "5" {
                return None;
            }
            let n = |i: usize| f[i].trim().parse::<u32>().ok();
            let word = Word {
                left: n(6)?,
                top: n(7)?,
                width: n(8)?,
                height: n(9)?,
                confidence: f[10].trim().parse().ok()?,
                alphanumeric: f[11].chars().any(char::is_alphanumeric),
            };
            (word.alphanumeric || !f[11].trim().is_empty()).then_some(word)
        })
        .collect()
}

/// Words at or above this confidence with a letter or digit are blacked out. Low on purpose: a
/// false box costs a little image, a missed one a name.
const REDACT_CONFIDENCE: f32 = 10.0;
/// After cleaning, a word at or above this confidence with a letter or digit is "readable" and
/// holds the image back.
const READABLE_CONFIDENCE: f32 = 40.0;
/// Frames are stacked into one picture per OCR run up to this height (rows).
const STACK_ROWS: usize = 4096;
/// Black rows between stacked frames, so no word spans two frames.
const STACK_GAP: usize = 16;

/// An 8-bit grey picture for the OCR engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreyImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl GreyImage {
    /// Binary PGM (P5), which Tesseract reads from standard input.
    pub fn to_pgm(&self) -> Vec<u8> {
        let mut out = format!("P5\n{} {}\n255\n", self.width, self.height).into_bytes();
        out.extend_from_slice(&self.pixels);
        out
    }
}

/// A box in one frame, in pixel coordinates of the image (columns x, rows y).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TextBox {
    pub frame: u32,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// What OCR did to one image, for its audit entry. Counts and boxes only: never the text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OcrEvidence {
    /// Always `clean-pixel-data`.
    pub mode: String,
    /// The engine's version line, e.g. `tesseract 5.3.0`.
    pub engine: String,
    pub frames: u32,
    /// Words found by the first pass.
    pub boxes_found: usize,
    /// Boxes blacked out (after padding; overlapping words are separate boxes).
    pub boxes_redacted: usize,
    /// Readable words the second pass still found (0 for a released image).
    pub residual_readable: usize,
    pub redacted: Vec<TextBox>,
    /// The transfer syntax of compressed pixel data that was decoded to be cleaned (the output
    /// is then written uncompressed, Explicit VR Little Endian: no second lossy generation).
    pub decoded_from: Option<String>,
    /// True when that compressed pixel data was lossy: the output keeps LossyImageCompression
    /// 01 and names the original method, as PS3.3 C.7.6.1.1.5 requires.
    pub lossy_reencoded: bool,
}

impl OcrEvidence {
    /// One line for an audit entry or a quarantine reason (no PHI).
    pub fn summary(&self) -> String {
        format!(
            "mode {}, engine {}, {} frame(s), {} text box(es) found, {} redacted, {} readable after cleaning",
            self.mode,
            self.engine,
            self.frames,
            self.boxes_found,
            self.boxes_redacted,
            self.residual_readable
        )
    }
}

fn quarantine(reason: impl Into<String>) -> DeidError {
    DeidError::Quarantined {
        reason: reason.into(),
    }
}

fn number(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    let e = obj.get(tag)?;
    e.to_int::<u32>()
        .ok()
        .or_else(|| e.to_str().ok()?.trim().parse().ok())
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_ascii_uppercase())
        .unwrap_or_default()
}

/// The layout of native pixel data, from the image pixel attributes.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rows: usize,
    cols: usize,
    spp: usize,
    bytes_per_sample: usize,
    planar: bool,
    frames: usize,
    signed: bool,
    bits_stored: u32,
    photometric: Photometric,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Photometric {
    Monochrome1,
    Monochrome2,
    Rgb,
    YbrFull,
    Palette,
}

impl Layout {
    fn of(obj: &InMemDicomObject) -> Result<Layout, DeidError> {
        let rows = number(obj, tags::ROWS).ok_or_else(|| quarantine("pixel data without Rows"))?;
        let cols =
            number(obj, tags::COLUMNS).ok_or_else(|| quarantine("pixel data without Columns"))?;
        let spp = number(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
        let bits = number(obj, tags::BITS_ALLOCATED).unwrap_or(0);
        let photometric =
            match text(obj, tags::PHOTOMETRIC_INTERPRETATION).as_str() {
                "MONOCHROME1" => Photometric::Monochrome1,
                "MONOCHROME2" | "" => Photometric::Monochrome2,
                "RGB" => Photometric::Rgb,
                "YBR_FULL" => Photometric::YbrFull,
                "PALETTE COLOR" => Photometric::Palette,
                _ => return Err(quarantine(
                    "photometric interpretation cannot be cleaned by OCR (subsampled or unknown)",
                )),
            };
        if !(bits == 8 || bits == 16) || !(spp == 1 || spp == 3) || rows == 0 || cols == 0 {
            return Err(quarantine(
                "pixel layout cannot be cleaned by OCR (8 or 16 bits allocated, 1 or 3 samples)",
            ));
        }
        if (spp == 3) != matches!(photometric, Photometric::Rgb | Photometric::YbrFull) {
            return Err(quarantine(
                "samples per pixel do not match the photometric interpretation",
            ));
        }
        if rows > 16384 || cols > 16384 {
            return Err(quarantine("image too large for OCR cleaning"));
        }
        Ok(Layout {
            rows: rows as usize,
            cols: cols as usize,
            spp: spp as usize,
            bytes_per_sample: bits as usize / 8,
            planar: number(obj, tags::PLANAR_CONFIGURATION).unwrap_or(0) == 1 && spp > 1,
            frames: number(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as usize,
            signed: number(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1,
            bits_stored: number(obj, tags::BITS_STORED)
                .unwrap_or(bits)
                .clamp(1, bits),
            photometric,
        })
    }

    fn frame_bytes(&self) -> usize {
        self.rows * self.cols * self.spp * self.bytes_per_sample
    }

    /// Byte offset of sample `s` of pixel (r, c) in frame `f`.
    fn offset(&self, f: usize, r: usize, c: usize, s: usize) -> usize {
        let b = self.bytes_per_sample;
        let base = f * self.frame_bytes();
        if self.planar {
            base + (s * self.rows * self.cols + r * self.cols + c) * b
        } else {
            base + ((r * self.cols + c) * self.spp + s) * b
        }
    }

    /// The stored value of one sample, as a number (sign and bits stored applied).
    fn value(&self, px: &[u8], at: usize) -> i32 {
        if self.bytes_per_sample == 1 {
            return i32::from(px[at]);
        }
        let raw = u16::from_le_bytes([px[at], px[at + 1]]);
        let mask = if self.bits_stored >= 16 {
            u16::MAX
        } else {
            (1u16 << self.bits_stored) - 1
        };
        let v = raw & mask;
        if self.signed && self.bits_stored < 32 && v & (1 << (self.bits_stored - 1)) != 0 {
            i32::from(v) - (1i32 << self.bits_stored)
        } else {
            i32::from(v)
        }
    }

    fn write(&self, px: &mut [u8], at: usize, v: i32) {
        if self.bytes_per_sample == 1 {
            px[at] = v.clamp(0, 255) as u8;
        } else {
            px[at..at + 2].copy_from_slice(&(v as u16).to_le_bytes());
        }
    }

    /// The brightness OCR sees at one pixel (before scaling).
    fn brightness(&self, px: &[u8], f: usize, r: usize, c: usize) -> i32 {
        match self.photometric {
            Photometric::Rgb => {
                let v = |s| self.value(px, self.offset(f, r, c, s));
                (299 * v(0) + 587 * v(1) + 114 * v(2)) / 1000
            }
            _ => self.value(px, self.offset(f, r, c, 0)),
        }
    }

    /// Frame `f` scaled to 0-255 between its darkest and brightest values.
    fn grey_frame(&self, px: &[u8], f: usize) -> GreyImage {
        let mut vals = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                vals.push(self.brightness(px, f, r, c));
            }
        }
        let lo = vals.iter().copied().min().unwrap_or(0);
        let hi = vals.iter().copied().max().unwrap_or(0);
        let span = (hi - lo).max(1) as i64;
        GreyImage {
            width: self.cols,
            height: self.rows,
            pixels: vals
                .into_iter()
                .map(|v| ((i64::from(v - lo) * 255) / span) as u8)
                .collect(),
        }
    }

    /// The stored values that show black in frame `f`, one per sample.
    fn black(&self, px: &[u8], f: usize) -> [i32; 3] {
        match self.photometric {
            Photometric::Rgb => [0, 0, 0],
            Photometric::YbrFull => [0, 128, 128],
            Photometric::Monochrome1 | Photometric::Monochrome2 | Photometric::Palette => {
                let mut lo = i32::MAX;
                let mut hi = i32::MIN;
                for r in 0..self.rows {
                    for c in 0..self.cols {
                        let v = self.value(px, self.offset(f, r, c, 0));
                        lo = lo.min(v);
                        hi = hi.max(v);
                    }
                }
                let v = if self.photometric == Photometric::Monochrome1 {
                    hi
                } else {
                    lo
                };
                [v, v, v]
            }
        }
    }

    fn fill(&self, px: &mut [u8], b: &TextBox, black: [i32; 3]) {
        let f = b.frame as usize;
        let (x1, y1) = (
            (b.x + b.width).min(self.cols as u32) as usize,
            (b.y + b.height).min(self.rows as u32) as usize,
        );
        for r in b.y as usize..y1 {
            for c in b.x as usize..x1 {
                for (s, v) in black.iter().enumerate().take(self.spp) {
                    let at = self.offset(f, r, c, s);
                    self.write(px, at, *v);
                }
            }
        }
    }
}

/// Transfer syntaxes whose compression loses information, and the PS3.3 method name of each.
const LOSSY: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.4.50", "ISO_10918_1"),
    ("1.2.840.10008.1.2.4.51", "ISO_10918_1"),
    ("1.2.840.10008.1.2.4.81", "ISO_14495_1"),
    ("1.2.840.10008.1.2.4.91", "ISO_15444_1"),
    ("1.2.840.10008.1.2.4.93", "ISO_15444_1"),
];

/// Decodes compressed (encapsulated) pixel data into native little-endian values with the
/// codec dicom-rs has for its transfer syntax, and makes the object say so (Explicit VR Little
/// Endian; RGB, interleaved, for colour, as the decoders deliver it). Returns the original
/// transfer syntax and whether it was lossy, or `None` for pixel data that was native already.
fn decode_encapsulated(
    obj: &mut dicom_object::DefaultDicomObject,
) -> Result<Option<(String, bool)>, DeidError> {
    use dicom_encoding::transfer_syntax::Codec;
    use dicom_transfer_syntax_registry::{entries, TransferSyntaxIndex, TransferSyntaxRegistry};
    let encapsulated = matches!(
        obj.get(tags::PIXEL_DATA).map(|e| e.value()),
        Some(Value::PixelSequence(_))
    );
    if !encapsulated {
        return Ok(None);
    }
    let uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let ts = TransferSyntaxRegistry
        .get(&uid)
        .ok_or_else(|| quarantine(format!("unknown transfer syntax {uid}")))?;
    let Codec::EncapsulatedPixelData(Some(reader), _) = ts.codec() else {
        return Err(quarantine(format!(
            "compressed pixel data ({}) has no decoder here, so it cannot be cleaned by OCR",
            ts.name()
        )));
    };
    let layout = Layout::of(obj)?;
    let mut native = Vec::new();
    reader.decode(&*obj, &mut native).map_err(|_| {
        quarantine(format!(
            "compressed pixel data ({}) could not be decoded, so it cannot be cleaned by OCR",
            ts.name()
        ))
    })?;
    if native.len() < layout.frame_bytes().saturating_mul(layout.frames) {
        return Err(quarantine("decoded pixel data is shorter than the image"));
    }
    let lossy = LOSSY.iter().find(|(u, _)| *u == uid).map(|(_, m)| *m);
    let declared_lossy = text(obj, tags::LOSSY_IMAGE_COMPRESSION) == "01";
    let vr = if layout.bytes_per_sample == 1 {
        VR::OB
    } else {
        VR::OW
    };
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        vr,
        PrimitiveValue::U8(native.into()),
    ));
    if layout.spp == 3 {
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "RGB",
        ));
        obj.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0_u16),
        ));
    }
    if let Some(method) = lossy {
        obj.put(DataElement::new(
            tags::LOSSY_IMAGE_COMPRESSION,
            VR::CS,
            "01",
        ));
        if obj.get(tags::LOSSY_IMAGE_COMPRESSION_METHOD).is_none() {
            obj.put(DataElement::new(
                tags::LOSSY_IMAGE_COMPRESSION_METHOD,
                VR::CS,
                method,
            ));
        }
    }
    obj.meta_mut()
        .set_transfer_syntax(&entries::EXPLICIT_VR_LITTLE_ENDIAN);
    Ok(Some((uid, lossy.is_some() || declared_lossy)))
}

/// Native pixel data as little-endian bytes, and its VR.
fn take_native_pixels(obj: &mut InMemDicomObject, ts: &str) -> Result<(Vec<u8>, VR), DeidError> {
    if ts == "1.2.840.10008.1.2.2" {
        return Err(quarantine(
            "big-endian pixel data cannot be cleaned by OCR in this version",
        ));
    }
    let elem = obj
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| quarantine("no pixel data to clean"))?;
    let vr = elem.vr();
    let bytes = match elem.value() {
        Value::PixelSequence(_) => {
            return Err(quarantine(
                "compressed (encapsulated) pixel data cannot be cleaned by OCR in this version",
            ))
        }
        Value::Sequence(_) => {
            return Err(DeidError::Malformed {
                reason: "PixelData is a sequence".into(),
            })
        }
        Value::Primitive(PrimitiveValue::U16(v)) => {
            v.iter().flat_map(|w| w.to_le_bytes()).collect()
        }
        Value::Primitive(PrimitiveValue::I16(v)) => {
            v.iter().flat_map(|w| w.to_le_bytes()).collect()
        }
        Value::Primitive(PrimitiveValue::U8(v)) => v.to_vec(),
        Value::Primitive(_) => return Err(quarantine("pixel data of unexpected type")),
    };
    Ok((bytes, vr))
}

/// Words of every frame, each mapped back to its frame: frames are stacked into tall pictures
/// (one engine run each) separated by black rows.
fn ocr_frames(
    engine: &OcrEngine,
    layout: &Layout,
    px: &[u8],
) -> Result<Vec<(u32, Word)>, OcrError> {
    let per_run = (STACK_ROWS / (layout.rows + STACK_GAP)).max(1);
    let mut out = Vec::new();
    let mut f0 = 0;
    while f0 < layout.frames {
        let n = per_run.min(layout.frames - f0);
        let stride = layout.rows + STACK_GAP;
        let mut sheet = GreyImage {
            width: layout.cols,
            height: stride * n - STACK_GAP,
            pixels: vec![0; layout.cols * (stride * n - STACK_GAP)],
        };
        for i in 0..n {
            let g = layout.grey_frame(px, f0 + i);
            let at = i * stride * layout.cols;
            sheet.pixels[at..at + g.pixels.len()].copy_from_slice(&g.pixels);
        }
        for w in engine.words(&sheet)? {
            let i = (w.top as usize / stride).min(n - 1);
            let mut w = w;
            w.top = w.top.saturating_sub((i * stride) as u32);
            out.push(((f0 + i) as u32, w));
        }
        f0 += n;
    }
    Ok(out)
}

/// A word's box grown by a margin (a third of its height, at least 2 pixels) so anti-aliased
/// edges of the glyphs go too, clipped to the image.
fn padded(frame: u32, w: &Word, layout: &Layout) -> TextBox {
    let m = (w.height / 3).max(2);
    let x = w.left.saturating_sub(m);
    let y = w.top.saturating_sub(m);
    let x1 = (w.left + w.width + m).min(layout.cols as u32);
    let y1 = (w.top + w.height + m).min(layout.rows as u32);
    TextBox {
        frame,
        x,
        y,
        width: x1.saturating_sub(x),
        height: y1.saturating_sub(y),
    }
}

/// Why an image may show a recognisable face (PS3.15 treats it like burned-in text), or `None`.
/// OCR removes text, not faces, so such an image is never released by this mode. The one
/// definition of "may show a face" is [`super::visual::recognizable_features`].
pub fn face_risk(obj: &InMemDicomObject) -> Option<String> {
    super::visual::recognizable_features(obj)
}

/// Finds burned-in text with OCR, blacks it out in every frame's pixel data, reads the result
/// again and returns the evidence when nothing readable remains. `declared` is true when the
/// image says BurnedInAnnotation YES. Any other outcome is a quarantine whose reason gives the
/// counts (never the text). On success BurnedInAnnotation becomes NO.
pub fn clean_burned_in_text(
    obj: &mut dicom_object::DefaultDicomObject,
    engine: &OcrEngine,
    risk: &str,
    declared: bool,
) -> Result<OcrEvidence, DeidError> {
    if let Some(face) = face_risk(obj) {
        return Err(quarantine(format!(
            "{face}: it may show a face, which OCR does not remove; held back for review"
        )));
    }
    let unavailable = |e: OcrError| quarantine(format!("{risk}; {e}, so it is held back"));
    let version = engine.version().map_err(unavailable)?;
    let decoded = decode_encapsulated(obj).map_err(|e| match e {
        DeidError::Quarantined { reason } => quarantine(format!("{risk}; {reason}")),
        other => other,
    })?;
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let ts = ts.as_str();
    let layout = Layout::of(obj).map_err(|e| quarantine(format!("{risk}; {}", e.reason())))?;
    let (mut px, vr) = take_native_pixels(obj, ts).map_err(|e| match e {
        DeidError::Quarantined { reason } => quarantine(format!("{risk}; {reason}")),
        other => other,
    })?;
    if px.len() < layout.frame_bytes().saturating_mul(layout.frames) {
        return Err(DeidError::Malformed {
            reason: "pixel data shorter than Rows x Columns x frames".into(),
        });
    }
    let found = ocr_frames(engine, &layout, &px).map_err(unavailable)?;
    let boxes: Vec<TextBox> = found
        .iter()
        .filter(|(_, w)| w.alphanumeric && w.confidence >= REDACT_CONFIDENCE)
        .map(|(f, w)| padded(*f, w, &layout))
        .collect();
    let mut evidence = OcrEvidence {
        mode: MODE_NAME.into(),
        engine: version,
        frames: layout.frames as u32,
        boxes_found: found.iter().filter(|(_, w)| w.alphanumeric).count(),
        boxes_redacted: boxes.len(),
        residual_readable: 0,
        redacted: boxes.clone(),
        lossy_reencoded: decoded.as_ref().is_some_and(|d| d.1),
        decoded_from: decoded.map(|d| d.0),
    };
    if boxes.is_empty() && declared {
        return Err(quarantine(format!(
            "{risk}, but OCR found no text to remove ({}); held back for review",
            evidence.summary()
        )));
    }
    if !boxes.is_empty() {
        let blacks: Vec<[i32; 3]> = (0..layout.frames).map(|f| layout.black(&px, f)).collect();
        for b in &boxes {
            layout.fill(&mut px, b, blacks[b.frame as usize]);
        }
        let again = ocr_frames(engine, &layout, &px).map_err(unavailable)?;
        evidence.residual_readable = again
            .iter()
            .filter(|(_, w)| w.alphanumeric && w.confidence >= READABLE_CONFIDENCE)
            .count();
        if evidence.residual_readable > 0 {
            return Err(quarantine(format!(
                "{risk}; text is still readable after OCR cleaning ({})",
                evidence.summary()
            )));
        }
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        vr,
        PrimitiveValue::U8(px.into()),
    ));
    obj.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"));
    Ok(evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_words_keep_boxes_and_drop_text() {
        let tsv = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n\
                   1\t1\t0\t0\t0\t0\t0\t0\t640\t480\t-1\t\n\
                   5\t1\t1\t1\t1\t1\t11\t13\t88\t15\t57.3\tDOE*JOHN\n\
                   5\t1\t1\t1\t1\t2\t200\t13\t8\t15\t20.0\t--\n\
                   5\t1\t2\t1\t1\t1\t116\t96\t412\t368\t95.0\t \n";
        let words = parse_tsv(tsv);
        assert_eq!(words.len(), 2);
        assert_eq!((words[0].left, words[0].top, words[0].width), (11, 13, 88));
        assert!(words[0].alphanumeric);
        assert!(!words[1].alphanumeric);
        assert!(!format!("{words:?}").contains("DOE"));
    }

    #[test]
    fn mode_names_round_trip() {
        for m in BurnedInTextMode::ALL {
            assert_eq!(m.name().parse::<BurnedInTextMode>().unwrap(), m);
        }
        assert!("ocr".parse::<BurnedInTextMode>().is_err());
    }

    #[test]
    fn photographs_and_declared_faces_are_never_cleaned_by_ocr() {
        let mut o = mono16(4, 2, 1, vec![0; 8]);
        o.put(DataElement::new(tags::MODALITY, VR::CS, "XC"));
        let mut file = o
            .clone()
            .with_meta(
                dicom_object::FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.77.1.4")
                    .media_storage_sop_instance_uid("1.2.3"),
            )
            .unwrap();
        let e = clean_burned_in_text(&mut file, &OcrEngine::from_env(), "r", false);
        assert!(matches!(e, Err(DeidError::Quarantined { reason }) if reason.contains("face")));
        o.put(DataElement::new(
            tags::RECOGNIZABLE_VISUAL_FEATURES,
            VR::CS,
            "NO",
        ));
        assert!(face_risk(&o).is_none());
        o.put(DataElement::new(
            tags::RECOGNIZABLE_VISUAL_FEATURES,
            VR::CS,
            "YES",
        ));
        assert!(face_risk(&o).is_some());
    }

    #[test]
    fn missing_engine_is_unavailable_not_a_panic() {
        let e = OcrEngine::new("/nonexistent/tesseract");
        assert!(matches!(e.version(), Err(OcrError::Unavailable { .. })));
    }

    fn mono16(cols: u16, rows: u16, frames: u16, px: Vec<u16>) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        for (tag, v) in [
            (tags::ROWS, rows),
            (tags::COLUMNS, cols),
            (tags::SAMPLES_PER_PIXEL, 1),
            (tags::BITS_ALLOCATED, 16),
            (tags::BITS_STORED, 12),
            (tags::PIXEL_REPRESENTATION, 0),
        ] {
            o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
        }
        o.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            frames.to_string(),
        ));
        o.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2",
        ));
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(px.into()),
        ));
        o
    }

    #[test]
    fn boxes_are_filled_with_the_darkest_value_in_the_right_frame_only() {
        let mut o = mono16(
            4,
            2,
            2,
            vec![
                100, 200, 300, 400, 500, 600, 700, 800, 9, 9, 9, 9, 9, 9, 9, 9,
            ],
        );
        let layout = Layout::of(&o).unwrap();
        let (mut px, _) = take_native_pixels(&mut o, "1.2.840.10008.1.2.1").unwrap();
        let black = layout.black(&px, 0);
        assert_eq!(black[0], 100);
        layout.fill(
            &mut px,
            &TextBox {
                frame: 0,
                x: 1,
                y: 0,
                width: 2,
                height: 2,
            },
            black,
        );
        let vals: Vec<i32> = (0..16).map(|i| layout.value(&px, i * 2)).collect();
        assert_eq!(
            vals,
            vec![100, 100, 100, 400, 500, 100, 100, 800, 9, 9, 9, 9, 9, 9, 9, 9]
        );
        let g = layout.grey_frame(&px, 0);
        assert_eq!(g.pixels[0], 0);
        assert_eq!(g.pixels[7], 255);
    }

    #[test]
    fn stacked_frames_map_words_back_to_their_frame() {
        let layout = Layout::of(&mono16(4, 10, 3, vec![0; 120])).unwrap();
        let w = Word {
            left: 1,
            top: 2,
            width: 2,
            height: 3,
            confidence: 90.0,
            alphanumeric: true,
        };
        let b = padded(1, &w, &layout);
        assert_eq!((b.frame, b.x, b.y), (1, 0, 0));
        assert!(b.x + b.width <= 4 && b.y + b.height <= 10);
    }
}
