#!/usr/bin/env python3
"""Independent check of pacs-broker de-identification outputs with pydicom, against the table.

Usage: check_deid.py <table.csv> <options,comma,separated|-> <input1> <output1> [<input2> <output2>...]

For every (input, output) pair it checks, reading with pydicom (not with the Rust code):
- the output parses, keeps the transfer syntax, and its pixel data is byte-identical;
- PatientIdentityRemoved is YES, DeidentificationMethodCodeSequence holds DCM 113100 and one code
  per option, LongitudinalTemporalInformationModified matches the date options;
- at every depth, no attribute whose resolved action is X is present with a value, no Z
  attribute holds a value (Patient Name/ID/Accession may hold a 16-character token);
- no private attribute remains (this checker is for flows without a safe private list);
- no UID of the inputs (other than registered 1.2.840.10008 UIDs and class UIDs) is anywhere in
  any output, and wherever an input held a UID of the set at some path, the output holds the
  same replacement as the output at the UID's own place (references stay consistent).
Prints one line per problem and exits 1 if any.
"""
import csv
import re
import sys

import pydicom
from pydicom.tag import Tag

OPTION_COLUMNS = {
    "retain-safe-private": "rtn_safe_priv", "retain-uids": "rtn_uids",
    "retain-device-identity": "rtn_dev_id", "retain-institution-identity": "rtn_inst_id",
    "retain-patient-characteristics": "rtn_pat_chars",
    "retain-longitudinal-full-dates": "rtn_long_full_dates",
    "retain-longitudinal-modified-dates": "rtn_long_modif_dates",
    "clean-descriptors": "clean_desc", "clean-structured-content": "clean_struct_cont",
    "clean-graphics": "clean_graph",
}
CID7050 = {
    "retain-safe-private": "113111", "retain-uids": "113110", "retain-device-identity": "113109",
    "retain-institution-identity": "113112", "retain-patient-characteristics": "113108",
    "retain-longitudinal-full-dates": "113106", "retain-longitudinal-modified-dates": "113107",
    "clean-descriptors": "113105", "clean-structured-content": "113104", "clean-graphics": "113103",
}
CLASS_UID_KEYWORDS = {
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
    "ImplementationClassUID", "CodingSchemeUID", "ReferencedSOPClassUIDInFile",
    "ReferencedTransferSyntaxUIDInFile", "RelatedGeneralSOPClassUID",
    "OriginalSpecializedSOPClassUID", "SOPClassesInStudy", "MappingResourceUID",
    "CodingSchemeRegistry", "PrivateInformationCreatorUID",
}
PSEUDONYMS = {"PatientName", "PatientID", "AccessionNumber"}
TOKEN = re.compile(r"^[0-9A-Z]{16}$")

problems = []


def problem(msg):
    problems.append(msg)


def load_table(path, options):
    table, patterns = {}, []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            action = r["basic"]
            chosen = None
            for name in options:
                col = OPTION_COLUMNS.get(name)
                if col and r[col]:
                    if chosen != "K":
                        chosen = r[col] if (chosen is None or r[col] == "K") else chosen
            action = chosen or action
            m = re.fullmatch(r"\(([0-9A-Fx]{4}),([0-9A-Fx]{4})\)", r["tag"])
            if not m:
                continue
            digits = m.group(1) + m.group(2)
            if "x" in digits:
                patterns.append((re.compile(digits.replace("x", "[0-9A-F]")), action))
            else:
                table[int(digits, 16)] = action
    return table, patterns


def action_for(tag, table, patterns):
    if tag in table:
        return table[tag]
    text = "%08X" % tag
    if text[:2] in ("50", "60") and int(text[:4], 16) % 2 == 0 and int(text[2:4], 16) <= 0x1E:
        for rx, a in patterns:
            if rx.fullmatch(text):
                return a
    return None


def has_value(elem):
    if elem.VR == "SQ":
        return len(elem.value) > 0
    v = elem.value
    if v is None:
        return False
    if isinstance(v, (bytes, str)):
        return len(v.strip(b"\0 " if isinstance(v, bytes) else "\0 ")) > 0
    try:
        return len(v) > 0
    except TypeError:
        return True


def walk(ds, path=""):
    for elem in ds:
        yield path, elem
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from walk(item, "%s%s[%d]/" % (path, elem.tag, i))


def uid_values(elem):
    if elem.VR != "UI" or elem.value is None:
        return []
    vals = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
    return [str(v).strip("\0 ") for v in vals if str(v).strip("\0 ")]


def input_syntax(ds):
    """The input's transfer syntax: from its file meta group, or, for a bare data set without
    one (read with force=True), the encoding pydicom found it in."""
    ts = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return ts
    if ds.is_little_endian and ds.is_implicit_VR:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if ds.is_little_endian else "1.2.840.10008.1.2.2"


def main():
    table_path, opts = sys.argv[1], sys.argv[2]
    options = [] if opts == "-" else opts.split(",")
    table, patterns = load_table(table_path, options)
    pairs = list(zip(sys.argv[3::2], sys.argv[4::2]))
    # The replacement of every instance-level UID, learned from where it is defined.
    mapping = {}
    originals = set()
    loaded = []
    for src, out in pairs:
        a = pydicom.dcmread(src, force=True)
        try:
            b = pydicom.dcmread(out)
        except Exception as e:  # noqa: BLE001
            problem("%s: pydicom cannot read the output: %s" % (out, e))
            continue
        loaded.append((src, out, a, b))
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in a and kw in b and "retain-uids" not in options:
                mapping[str(a.data_element(kw).value)] = str(b.data_element(kw).value)
        for _, elem in walk(a):
            if elem.keyword not in CLASS_UID_KEYWORDS:
                for u in uid_values(elem):
                    if not u.startswith("1.2.840.10008."):
                        originals.add(u)
    for src, out, a, b in loaded:
        if input_syntax(a) != b.file_meta.TransferSyntaxUID:
            problem("%s: transfer syntax changed" % out)
        if "PixelData" in a:
            if "PixelData" not in b or a.PixelData != b.PixelData:
                problem("%s: pixel data is not byte-identical" % out)
        if b.get("PatientIdentityRemoved") != "YES":
            problem("%s: PatientIdentityRemoved is not YES" % out)
        codes = [str(i.CodeValue) for i in b.get("DeidentificationMethodCodeSequence", [])]
        if "113100" not in codes:
            problem("%s: DeidentificationMethodCodeSequence lacks 113100" % out)
        for o in options:
            if o in CID7050 and CID7050[o] not in codes:
                problem("%s: option %s has no CID 7050 code" % (out, o))
        want = "UNMODIFIED" if "retain-longitudinal-full-dates" in options else (
            "MODIFIED" if "retain-longitudinal-modified-dates" in options else "REMOVED")
        if b.get("LongitudinalTemporalInformationModified") != want:
            problem("%s: LongitudinalTemporalInformationModified is not %s" % (out, want))
        if b.file_meta.MediaStorageSOPInstanceUID != b.SOPInstanceUID:
            problem("%s: MediaStorageSOPInstanceUID differs from SOPInstanceUID" % out)
        for path, elem in walk(b):
            tag = int(elem.tag)
            where = "%s: %s%s %s" % (out, path, elem.tag, elem.keyword)
            if elem.tag.is_private:
                problem(where + " private attribute survived")
                continue
            act = action_for(tag, table, patterns)
            if act == "X" and has_value(elem):
                problem(where + " is X in the table but holds a value")
            if act == "Z" and has_value(elem):
                ok = elem.keyword in PSEUDONYMS and TOKEN.match(str(elem.value))
                if not ok:
                    problem(where + " is Z in the table but holds a value")
            for u in uid_values(elem) if elem.keyword not in CLASS_UID_KEYWORDS else []:
                if u in originals and "retain-uids" not in options:
                    problem(where + " holds an original UID")
        # Reference consistency: the same path in input and output.
        out_at = {}
        for path, elem in walk(b):
            out_at[path + str(elem.tag)] = elem
        for path, elem in walk(a):
            for i, u in enumerate(uid_values(elem)):
                if u in mapping:
                    o = out_at.get(path + str(elem.tag))
                    if o is None:
                        continue
                    got = uid_values(o)
                    if i < len(got) and got[i] != mapping[u]:
                        problem("%s: %s%s reference not remapped like its target" % (out, path, elem.tag))
    for p in problems:
        print(p)
    print("checked %d pairs, %d problems" % (len(loaded), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
