//! Writes `fuzz/dict/<target>.dict`, the libFuzzer dictionaries generated from the constants
//! the parsers use (`rdmig::fuzzing::dictionaries`). Run: `make fuzz-dicts`.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/dict");
    std::fs::create_dir_all(&dir).unwrap();
    for (target, contents) in rdmig::fuzzing::dictionaries() {
        std::fs::write(dir.join(format!("{target}.dict")), contents).unwrap();
    }
    println!("dictionaries written to {}", dir.display());
}
