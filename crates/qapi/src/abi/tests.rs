//! One crafted before/after schema pair per rule, and pairs that must pass.

use super::*;
use crate::schema::{introspect, MemSource, Schema};

/// The introspection of a schema written without documentation.
fn intro(src: &str) -> Vec<Value> {
    let text = format!("{{ 'pragma': {{ 'doc-required': false }} }}\n{src}");
    let files = [("t.json", text.as_str())];
    let schema = Schema::load(&MemSource(&files), "t.json", &|_| false)
        .unwrap_or_else(|e| panic!("test schema: {e}"));
    introspect(&schema)
}

/// (rule, path) of every finding.
fn diff(old: &str, new: &str) -> Vec<(Rule, String)> {
    compare(&intro(old), &intro(new))
        .into_iter()
        .map(|f| (f.rule, f.path))
        .collect()
}

const BASE: &str = "
{ 'enum': 'Color', 'data': [ 'red', 'green' ] }
{ 'struct': 'Info', 'data': { 'id': 'str', '*size': 'int', 'color': 'Color' } }
{ 'command': 'get', 'data': { 'id': 'str', '*verbose': 'bool' }, 'returns': 'Info' }
{ 'command': 'paint', 'data': { 'color': 'Color' } }
{ 'event': 'CHANGED', 'data': { 'id': 'str', '*why': 'str' } }
";

fn with(replace: &str, by: &str) -> String {
    assert!(BASE.contains(replace), "{replace}");
    BASE.replace(replace, by)
}

#[test]
fn compare_identical_schemas_finds_nothing() {
    assert_eq!(diff(BASE, BASE), vec![]);
}

#[test]
fn compare_command_removed_is_breaking() {
    let new = with("{ 'command': 'paint', 'data': { 'color': 'Color' } }", "");
    assert_eq!(
        diff(BASE, &new),
        vec![(Rule::CommandRemoved, "command 'paint'".to_string())]
    );
}

#[test]
fn compare_command_renamed_is_reported_as_removed() {
    let new = with("'command': 'paint'", "'command': 'colorize'");
    assert_eq!(
        diff(BASE, &new),
        vec![(Rule::CommandRemoved, "command 'paint'".to_string())]
    );
}

#[test]
fn compare_deprecated_command_removed_is_a_note() {
    let old = with(
        "{ 'command': 'paint', 'data': { 'color': 'Color' } }",
        "{ 'command': 'paint', 'data': { 'color': 'Color' }, 'features': [ 'deprecated' ] }",
    );
    let new = with("{ 'command': 'paint', 'data': { 'color': 'Color' } }", "");
    let f = compare(&intro(&old), &intro(&new));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].rule, Rule::RemovedAfterDeprecation);
    assert!(!f[0].rule.is_breaking());
}

#[test]
fn compare_event_removed_is_breaking() {
    let new = with(
        "{ 'event': 'CHANGED', 'data': { 'id': 'str', '*why': 'str' } }",
        "",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![(Rule::EventRemoved, "event 'CHANGED'".to_string())]
    );
}

#[test]
fn compare_argument_removed_is_breaking() {
    let new = with(
        "'data': { 'id': 'str', '*verbose': 'bool' }",
        "'data': { 'id': 'str' }",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![(
            Rule::MemberRemoved,
            "command 'get' arguments: member 'verbose'".to_string()
        )]
    );
}

#[test]
fn compare_argument_renamed_is_removed_plus_new_mandatory() {
    let new = with(
        "'data': { 'id': 'str', '*verbose': 'bool' }",
        "'data': { 'name': 'str', '*verbose': 'bool' }",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![
            (
                Rule::MemberRemoved,
                "command 'get' arguments: member 'id'".to_string()
            ),
            (
                Rule::MandatoryMemberAdded,
                "command 'get' arguments: member 'name'".to_string()
            ),
        ]
    );
}

#[test]
fn compare_argument_type_changed_is_breaking() {
    let new = with("'*verbose': 'bool' }", "'*verbose': 'str' }");
    let f = compare(&intro(BASE), &intro(&new));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].rule, Rule::TypeChanged);
    assert_eq!(f[0].path, "command 'get' arguments: member 'verbose'");
    assert_eq!(f[0].detail, "type changed from boolean to string");
}

#[test]
fn compare_optional_argument_made_mandatory_is_breaking() {
    let new = with("'*verbose': 'bool' }", "'verbose': 'bool' }");
    assert_eq!(
        diff(BASE, &new),
        vec![(
            Rule::OptionalBecameMandatory,
            "command 'get' arguments: member 'verbose'".to_string()
        )]
    );
}

#[test]
fn compare_new_mandatory_argument_is_breaking() {
    let new = with(
        "'data': { 'color': 'Color' } }",
        "'data': { 'color': 'Color', 'force': 'bool' } }",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![(
            Rule::MandatoryMemberAdded,
            "command 'paint' arguments: member 'force'".to_string()
        )]
    );
}

#[test]
fn compare_additions_and_relaxations_are_compatible() {
    // New optional argument, mandatory argument made optional, new command, new event, new
    // return member, new enum value.
    let new = BASE
        .replace(
            "'data': { 'id': 'str', '*verbose': 'bool' }",
            "'data': { '*id': 'str', '*verbose': 'bool', '*depth': 'int' }",
        )
        .replace(
            "'data': { 'id': 'str', '*size': 'int', 'color': 'Color' }",
            "'data': { 'id': 'str', '*size': 'int', 'color': 'Color', 'extra': 'str' }",
        )
        .replace("[ 'red', 'green' ]", "[ 'red', 'green', 'blue' ]")
        + "{ 'command': 'new-one' }\n{ 'event': 'NEW_EVENT' }\n";
    assert_eq!(diff(BASE, &new), vec![]);
}

#[test]
fn compare_enum_value_removed_is_breaking() {
    let new = with("[ 'red', 'green' ]", "[ 'red' ]");
    let got = diff(BASE, &new);
    assert!(
        got.contains(&(
            Rule::EnumValueRemoved,
            "command 'paint' arguments: member 'color'".to_string()
        )),
        "{got:?}"
    );
    assert!(
        got.iter().all(|(r, _)| *r == Rule::EnumValueRemoved),
        "{got:?}"
    );
}

#[test]
fn compare_deprecated_enum_value_removed_is_a_note() {
    let old = with(
        "[ 'red', 'green' ]",
        "[ 'red', { 'name': 'green', 'features': [ 'deprecated' ] } ]",
    );
    let new = with("[ 'red', 'green' ]", "[ 'red' ]");
    let f = compare(&intro(&old), &intro(&new));
    assert!(!f.is_empty());
    assert!(
        f.iter().all(|f| f.rule == Rule::RemovedAfterDeprecation),
        "{f:?}"
    );
}

#[test]
fn compare_return_member_removed_is_breaking() {
    let new = with(
        "'data': { 'id': 'str', '*size': 'int', 'color': 'Color' }",
        "'data': { 'id': 'str', 'color': 'Color' }",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![(
            Rule::MemberRemoved,
            "command 'get' return: member 'size'".to_string()
        )]
    );
}

#[test]
fn compare_return_member_made_optional_narrows_the_return() {
    let new = with(
        "'data': { 'id': 'str', '*size'",
        "'data': { '*id': 'str', '*size'",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![(
            Rule::ReturnNarrowed,
            "command 'get' return: member 'id'".to_string()
        )]
    );
}

#[test]
fn compare_return_type_changed_to_array_is_breaking() {
    let new = with("'returns': 'Info' }", "'returns': [ 'Info' ] }");
    let f = compare(&intro(BASE), &intro(&new));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].rule, Rule::TypeChanged);
    assert_eq!(f[0].path, "command 'get' return");
    assert_eq!(f[0].detail, "type changed from object to array of object");
}

#[test]
fn compare_event_member_removed_is_breaking() {
    let new = with(
        "'data': { 'id': 'str', '*why': 'str' } }",
        "'data': { '*id': 'str', '*why': 'str' } }",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![(
            Rule::ReturnNarrowed,
            "event 'CHANGED' data: member 'id'".to_string()
        )]
    );
    let new = with(
        "'data': { 'id': 'str', '*why': 'str' } }",
        "'data': { 'id': 'str' } }",
    );
    assert_eq!(
        diff(BASE, &new),
        vec![(
            Rule::MemberRemoved,
            "event 'CHANGED' data: member 'why'".to_string()
        )]
    );
}

#[test]
fn compare_deprecated_member_removed_is_a_note() {
    let old = with(
        "'*verbose': 'bool' }",
        "'*verbose': { 'type': 'bool', 'features': [ 'deprecated' ] } }",
    );
    let new = with(
        "'data': { 'id': 'str', '*verbose': 'bool' }",
        "'data': { 'id': 'str' }",
    );
    let f = compare(&intro(&old), &intro(&new));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].rule, Rule::RemovedAfterDeprecation);
}

#[test]
fn compare_argument_widened_to_alternate_is_compatible() {
    let new = with(
        "'data': { 'id': 'str', '*verbose': 'bool' }",
        "'data': { 'id': 'IdOrNum', '*verbose': 'bool' }",
    ) + "{ 'alternate': 'IdOrNum', 'data': { 's': 'str', 'n': 'int' } }\n";
    assert_eq!(diff(BASE, &new), vec![]);
}

#[test]
fn compare_alternate_branch_dropped_from_input_is_breaking() {
    let alt = "{ 'alternate': 'IdOrNum', 'data': { 's': 'str', 'n': 'int' } }\n";
    let old = with(
        "'data': { 'id': 'str', '*verbose': 'bool' }",
        "'data': { 'id': 'IdOrNum', '*verbose': 'bool' }",
    ) + alt;
    let new = with(
        "'data': { 'id': 'str', '*verbose': 'bool' }",
        "'data': { 'id': 'IdOrNum', '*verbose': 'bool' }",
    ) + "{ 'alternate': 'IdOrNum', 'data': { 's': 'str', 'b': 'bool' } }\n";
    let f = compare(&intro(&old), &intro(&new));
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].rule, Rule::TypeChanged);
    assert_eq!(f[0].detail, "alternate no longer accepts int");
}

#[test]
fn compare_type_renamed_is_not_a_change() {
    let new = BASE.replace("Info", "Details").replace("Color", "Colour");
    assert_eq!(diff(BASE, &new), vec![]);
}

#[test]
fn compare_union_branch_member_removed_is_breaking() {
    let old = "
{ 'enum': 'Kind', 'data': [ 'a', 'b' ] }
{ 'struct': 'A', 'data': { 'x': 'int' } }
{ 'struct': 'B', 'data': { 'y': 'str' } }
{ 'union': 'U', 'base': { 'kind': 'Kind' }, 'discriminator': 'kind', 'data': { 'a': 'A', 'b': 'B' } }
{ 'command': 'make', 'data': 'U', 'boxed': true }
";
    let new = old.replace("{ 'y': 'str' }", "{ }");
    assert_eq!(
        diff(old, &new),
        vec![(
            Rule::MemberRemoved,
            "command 'make' arguments (kind=b): member 'y'".to_string()
        )]
    );
    // Dropping the whole branch value is an enum value removal.
    let new = old
        .replace("[ 'a', 'b' ]", "[ 'a' ]")
        .replace(", 'b': 'B'", "");
    let got = diff(old, &new);
    assert_eq!(
        got,
        vec![(
            Rule::EnumValueRemoved,
            "command 'make' arguments (kind=a): member 'kind'".to_string()
        )]
    );
}

#[test]
fn compare_recursive_types_terminate() {
    let old = "
{ 'struct': 'Node', 'data': { 'name': 'str', '*child': 'Node', '*kids': [ 'Node' ] } }
{ 'alternate': 'Ref', 'data': { 'def': 'Opts', 'name': 'str' } }
{ 'struct': 'Opts', 'data': { 'file': 'Ref' } }
{ 'command': 'tree', 'data': { 'r': 'Ref' }, 'returns': 'Node' }
";
    assert_eq!(diff(old, old), vec![]);
    let new = old.replace("'*child': 'Node',", "");
    assert_eq!(
        diff(old, &new),
        vec![(
            Rule::MemberRemoved,
            "command 'tree' return: member 'child'".to_string()
        )]
    );
}

#[test]
fn finding_display_says_breaking_or_note() {
    let f = Finding {
        rule: Rule::CommandRemoved,
        path: "command 'x'".into(),
        detail: "gone".into(),
    };
    assert_eq!(
        f.to_string(),
        "BREAKING [command-removed] command 'x': gone"
    );
}

#[test]
fn check_real_schema_matches_its_baseline() {
    // What CI runs: the schema in the repository against the recorded baseline.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema");
    let report = check(&root, &root.join("baseline"), &host_config()).unwrap();
    let breaking: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.rule.is_breaking())
        .map(|f| f.to_string())
        .collect();
    assert_eq!(breaking, Vec::<String>::new());
}
