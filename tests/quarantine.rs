//! Must be true #4 (issue 11): quarantine review. A node's `send` holds back what its flow
//! quarantines; a privacy officer lists, shows (identifying values only with `--reveal`, and
//! audited), releases (de-identification and the verifier run again; an item that still fails
//! needs `--override`, and says so) and discards held items, each audited. A released item is
//! queued in the outbox and delivered; what the partner stores parses in dcmtk and pydicom.

mod common;
mod ocr_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Federation, AGREEMENT};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
}

fn run(config: &Path, args: &[&str], tesseract: &str) -> (i32, String, String) {
    let o = bin()
        .args(args)
        .arg("--config")
        .arg(config)
        .env("PACS_BROKER_TESSERACT", tesseract)
        .env("USER", "dpo-a")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// The test agreement with a second flow that removes burned-in text with OCR.
fn agreement_with_ocr_flow() -> String {
    common::agreement_toml("active", "false")
        + r#"
[[flows]]
name = "us-ocr"
from = "hospital-a"
to = "telerad-c"
purposes = ["treatment"]

[flows.deid]
burned_in_text = "clean-pixel-data"

[flows.retention]
days = 30
after = "delete"
"#
}

fn ids(list: &str) -> Vec<String> {
    list.lines()
        .filter(|l| l.starts_with('q'))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

fn audit_actions(data: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["action"].as_str().unwrap().to_string(),
                v["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn officer_lists_shows_releases_and_discards_held_items() {
    let fed = Federation::start(&["telerad-c"]).await;
    let base = fed.dir.path().to_path_buf();
    // hospital-a runs as separate processes (send, quarantine, outbox), as a site would.
    let cfg = common::site_config(&base, "hospital-a", &fed.addrs);
    for site in ["hospital-a", "telerad-c"] {
        let policy = base.join(site).join("agreements/test.toml");
        std::fs::write(&policy, agreement_with_ocr_flow()).unwrap();
        common::sign_by_all(&base, &policy);
    }
    fed.node("telerad-c").reload_agreements();
    let config = base.join("hospital-a/node.toml");
    std::fs::write(&config, cfg.to_toml()).unwrap();
    let data = cfg.data_dir.clone();

    let inputs = base.join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let (texted, _) =
        ocr_common::us_with_text("1.2.826.0.1.3680043.10.1137.21", 7, ocr_common::SCREEN_TEXT);
    texted.write_to_file(inputs.join("DOE_JOHN-1.dcm")).unwrap();
    let (plain, _) = ocr_common::us_with_text("1.2.826.0.1.3680043.10.1137.22", 9, &[]);
    plain.write_to_file(inputs.join("DOE_JOHN-2.dcm")).unwrap();

    // The ct-reads flow holds ultrasound back: both images go to the quarantine.
    let inputs_s = inputs.to_str().unwrap().to_string();
    let send = |flow: &str, tesseract: &str| {
        let o = bin()
            .args(["send", "--agreement", AGREEMENT, "--flow", flow, "--config"])
            .arg(&config)
            .arg(&inputs_s)
            .env("PACS_BROKER_TESSERACT", tesseract)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
    };
    let sent = send("ct-reads", "tesseract");
    assert!(sent.contains("held for review as q"), "{sent}");

    let (code, list, _) = run(&config, &["quarantine", "list"], "tesseract");
    assert_eq!(code, 0);
    let held = ids(&list);
    assert_eq!(held.len(), 2, "{list}");
    assert!(
        list.contains("US image without BurnedInAnnotation NO"),
        "{list}"
    );
    for phi in ["DOE", "JOHN", "4471180"] {
        assert!(!list.contains(phi), "{phi} in the list: {list}");
    }

    let (code, show, _) = run(&config, &["quarantine", "show", &held[0]], "tesseract");
    assert_eq!(code, 0);
    assert!(
        show.contains("reason:") && show.contains("clean-pixel-data"),
        "{show}"
    );
    assert!(!show.contains("DOE"), "no PHI without --reveal: {show}");
    let (code, revealed, _) = run(
        &config,
        &["quarantine", "show", &held[0], "--reveal"],
        "tesseract",
    );
    assert_eq!(code, 0);
    assert!(
        revealed.contains("DOE^JOHN") && revealed.contains("DOE_JOHN-"),
        "{revealed}"
    );

    // Release without override: the flow still holds ultrasound back, so it is refused and says so.
    let (code, _, err) = run(
        &config,
        &[
            "quarantine",
            "release",
            &held[0],
            "--justification",
            "reviewed: the overlay shows no identity",
        ],
        "tesseract",
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("still fails the verifier") && err.contains("--override"),
        "{err}"
    );
    // With the override it is released to the outbox, and says that it was overridden.
    let (code, out, err) = run(
        &config,
        &[
            "quarantine",
            "release",
            &held[0],
            "--justification",
            "reviewed: the overlay shows no identity",
            "--override",
        ],
        "tesseract",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("OVERRIDE") && out.contains("queued in the outbox"),
        "{out}"
    );
    let delivered = bin()
        .args(["outbox", "--retry", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&delivered.stdout);
    assert!(out.contains("1 queued studies delivered"), "{out}");

    let (code, out, err) = run(
        &config,
        &[
            "quarantine",
            "discard",
            &held[1],
            "--justification",
            "duplicate of a released image",
        ],
        "tesseract",
    );
    assert_eq!(code, 0, "{out}{err}");
    let (_, list, _) = run(&config, &["quarantine", "list"], "tesseract");
    assert!(ids(&list).is_empty(), "{list}");
    assert!(run(&config, &["quarantine", "show", &held[1]], "tesseract").0 != 0);

    // The OCR flow with OCR missing holds both images back; with OCR present again, release
    // re-runs de-identification and passes the verifier without any override.
    let sent = send("us-ocr", "/nonexistent/tesseract");
    assert!(sent.contains("OCR is not available"), "{sent}");
    let (_, list, _) = run(&config, &["quarantine", "list"], "tesseract");
    let held = ids(&list);
    assert_eq!(held.len(), 2, "{list}");
    for id in &held {
        let (code, out, err) = run(
            &config,
            &[
                "quarantine",
                "release",
                id,
                "--justification",
                "OCR is installed again",
            ],
            "tesseract",
        );
        assert_eq!(code, 0, "{out}{err}");
        assert!(!out.contains("OVERRIDE"), "{out}");
    }

    // The outbox delivers what was released; the partner stores it and it parses everywhere.
    let o = bin()
        .args(["outbox", "--retry", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let inbox: Vec<PathBuf> = common::files_under(&base.join("telerad-c/data/store/inbox"));
    // Two instances: the image released by override came back through the OCR flow and was
    // released again (cleaned this time), under the same de-identified SOP Instance UID.
    assert_eq!(inbox.len(), 2, "{out}");
    for f in &inbox {
        let (ok, text) = common::run_tool("dcmdump", &["-q", f.to_str().unwrap()]);
        assert!(ok, "{text}");
        assert!(!text.contains("DOE"), "PHI in a delivered file");
        let (ok, text) = common::run_tool(
            "/usr/bin/python3",
            &[
                "-c",
                "import pydicom,sys; d=pydicom.dcmread(sys.argv[1]); assert len(d.PixelData) == d.Rows * d.Columns * d.SamplesPerPixel * d.BitsAllocated // 8 * int(d.get('NumberOfFrames', 1))",
                f.to_str().unwrap(),
            ],
        );
        assert!(ok, "{text}");
    }

    let actions = audit_actions(&data);
    let count = |a: &str| actions.iter().filter(|(x, _)| x == a).count();
    assert_eq!(count("quarantine-hold"), 4, "{actions:?}");
    assert_eq!(count("quarantine-reveal"), 1);
    assert_eq!(count("quarantine-discard"), 1);
    let releases: Vec<&String> = actions
        .iter()
        .filter(|(a, _)| a == "quarantine-release")
        .map(|(_, o)| o)
        .collect();
    assert_eq!(releases.len(), 4, "{releases:?}");
    assert!(releases[0].starts_with("refused: still fails the verifier"));
    assert!(releases[1].contains("override"));
    assert!(releases.iter().all(|o| o.contains("justification: ")));
    // The two OCR releases also carry the OCR evidence (mode, engine, boxes).
    assert_eq!(count("clean-pixel-data"), 2, "{actions:?}");
    for (_, o) in &actions {
        assert!(
            !o.contains("DOE") && !o.contains("4471180"),
            "PHI in the audit log: {o}"
        );
    }
    // Nothing is left half-written, and held items were private to the node's user.
    fed.stop().await;
}
