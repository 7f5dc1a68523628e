//! The text-poke log replays to the text exactly: the file's bytes plus
//! every logged edit, in order, equal what the process runs.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use altpatch::os::linux::set_live_publication;
use altpatch::{Image, LinuxPoke, Publish};

use super::scenarios::{expected, tools_sites, update};

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex_num(v: &serde_json::Value) -> u64 {
    let s = v.as_str().expect("64-bit values are strings");
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// Updates by every publication with the log on (`ALTPATCH_POKE_LOG`, set
/// by the parent), then replays the log over the file and compares.
pub fn replay() {
    let path = std::env::var("ALTPATCH_POKE_LOG").unwrap();
    for publish in [Publish::Remap, Publish::Live] {
        set_live_publication(publish).unwrap();
        for on in [true, false, true] {
            update(on).unwrap();
            assert_eq!(tools_sites(1), expected(on));
        }
    }
    let image = Image::current();
    let mut poke = LinuxPoke::new().unwrap();
    let features = altpatch::cpu::Features::detect();
    // SAFETY: no other thread runs the alternatives.
    unsafe { altpatch::alternative::apply(&image, &features, &mut poke) }.unwrap();
    let log = std::fs::read_to_string(&path).unwrap();
    let mut bytes: BTreeMap<usize, u8> = BTreeMap::new();
    let mut files: BTreeMap<String, std::fs::File> = BTreeMap::new();
    let mut last_seq = 0;
    let mut edits = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(v["v"], 1);
        assert_eq!(v["pid"], std::process::id());
        let seq = v["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "seq out of order");
        last_seq = seq;
        assert!(v["monotonic_ns"].as_str().unwrap().parse::<u64>().is_ok());
        for e in v["edits"].as_array().unwrap() {
            let addr = hex_num(&e["addr"]) as usize;
            let old = hex_bytes(e["old"].as_str().unwrap());
            let new = hex_bytes(e["new"].as_str().unwrap());
            assert_eq!(old.len(), new.len());
            let file = e["file"]
                .as_str()
                .expect("the test binary's text is a file's");
            let offset = hex_num(&e["offset"]);
            let f = files
                .entry(file.to_string())
                .or_insert_with(|| std::fs::File::open(file).unwrap());
            for (k, (o, n)) in old.iter().zip(&new).enumerate() {
                // The first time an address appears, it holds the file's
                // byte, and the edit's old byte is that.
                let b = bytes.entry(addr + k).or_insert_with(|| {
                    let mut b = [0u8];
                    f.read_exact_at(&mut b, offset + k as u64).unwrap();
                    b[0]
                });
                assert_eq!(
                    *b,
                    *o,
                    "old byte at {:#x} is not the replayed one",
                    addr + k
                );
                *b = *n;
            }
            edits += 1;
        }
    }
    assert!(edits > 0, "nothing was logged");
    for (&a, &b) in &bytes {
        // SAFETY: a logged text address of this process.
        let now = unsafe { std::ptr::read_volatile(a as *const u8) };
        assert_eq!(now, b, "the replay differs from the text at {a:#x}");
    }
    println!(
        "{} batches, {edits} edits replay to the text ({} bytes)",
        last_seq,
        bytes.len()
    );
}
