//! The transition tables are data (`rdmig_model::table`): a snapshot makes every added or
//! removed edge a reviewable diff, and the spec quotes them verbatim.

use std::path::PathBuf;

/// Every edge of both machines, as `table::render()` prints it.
#[test]
fn transition_table_snapshot() {
    insta::assert_snapshot!(rdmig_model::table::render());
}

/// The spec's section 9 says its "Source" and "Destination" tables are `table::render()`
/// verbatim: the rendered text must appear in `spec/protocol.md` as one piece.
#[test]
fn spec_state_tables_equal_table_render() {
    let spec = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec/protocol.md"),
    )
    .expect("spec/protocol.md");
    let rendered = rdmig_model::table::render();
    assert!(
        spec.contains(&rendered),
        "spec/protocol.md section 9 differs from table::render(); paste this in:\n{rendered}"
    );
}
