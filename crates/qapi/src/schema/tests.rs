//! The schema rules: one bad schema per rule, conditions, includes, documentation.

use super::*;

fn load(files: &[(&str, &str)], cfg: &[&str]) -> Result<Schema, String> {
    Schema::load(&MemSource(files), files[0].0, &|c| cfg.contains(&c)).map_err(|e| e.to_string())
}

/// Loads one undocumented file.
fn one(src: &str) -> Result<Schema, String> {
    let text = format!("{{ 'pragma': {{ 'doc-required': false }} }}\n{src}");
    load(&[("t.json", &text)], &[])
}

fn err(src: &str) -> String {
    one(src).expect_err("schema should be refused")
}

#[test]
fn load_resolves_members_and_implicit_types() {
    let s = one("{ 'struct': 'B', 'data': { 'a': 'int' } }
         { 'struct': 'S', 'base': 'B', 'data': { '*b': ['str'] } }
         { 'command': 'c', 'data': { 'x': 'S' }, 'returns': 'S' }")
    .unwrap();
    let names: Vec<&str> = s
        .struct_members("S")
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    let arg = s.get("q_obj_c-arg").unwrap();
    assert!(arg.implicit);
    let Kind::Command(c) = &s.get("c").unwrap().kind else {
        panic!()
    };
    assert_eq!(c.data.as_deref(), Some("q_obj_c-arg"));
}

#[test]
fn load_rejects_rule_violations() {
    let cases = [
        ("{ 'struct': 'S', 'data': { 'a': 'Nope' } }", "member 'a' of 'S' uses unknown type 'Nope'"),
        ("{ 'struct': 'S' }\n{ 'struct': 'S' }", "'S' is already defined at t.json:2"),
        ("{ 'struct': 'str' }", "'str' is a built-in type"),
        ("{ 'struct': 'lower' }", "type name 'lower' must be CamelCase"),
        ("{ 'struct': 'ThingList' }", "type name 'ThingList' must not end in 'List'"),
        ("{ 'struct': 'S', 'data': { 'Bad_Name': 'int' } }", "member name 'Bad_Name' must be lower-case-with-dashes"),
        ("{ 'struct': 'S', 'data': { 'has-x': 'int' } }", "member name 'has-x' is reserved"),
        ("{ 'command': 'Bad' }", "command name 'Bad' must be lower-case-with-dashes"),
        ("{ 'event': 'bad' }", "event name 'bad' must be ALL_CAPS"),
        ("{ 'enum': 'E', 'data': [] }", "enum 'E' has no values"),
        ("{ 'enum': 'E', 'data': [ 'a', 'a' ] }", "enum 'E' has value 'a' twice"),
        ("{ 'struct': 'S', 'base': 'S' }", "'S' is its own base"),
        ("{ 'struct': 'S', 'bogus': 1 }", "stray '1'"),
        ("{ 'struct': 'S', 'bogus': true }", "unknown key 'bogus' (expected one of: struct, data, base, if, features)"),
        ("{ 'command': 'c', 'returns': 'int' }", "command 'c' must return an object or an array of objects"),
        ("{ 'command': 'c', 'boxed': true }", "'c' is boxed but has no 'data'"),
        ("{ 'alternate': 'A', 'data': { 'x': 'int', 'y': 'number' } }", "branches 'x' and 'y' of alternate 'A' are both JSON numbers"),
        ("{ 'alternate': 'A', 'data': { 'x': 'int' } }", "alternate 'A' needs at least two branches"),
        ("{ 'struct': 'S', 'data': { 'a': { 'type': 'int', 'features': [ 'x', 'x' ] } } }", "feature 'x' listed twice"),
        ("{ 'frob': 'x' }", "expression has no known meta-type key (enum, struct, union, alternate, command, event, include or pragma)"),
    ];
    for (src, want) in cases {
        let e = err(src);
        assert!(e.ends_with(want), "{src}\n  got: {e}\n want: {want}");
    }
}

#[test]
fn load_checks_union_shape() {
    let pre = "{ 'enum': 'K', 'data': [ 'a', 'b' ] }
               { 'struct': 'A', 'data': { 'x': 'int' } }\n";
    let cases = [
        ("{ 'union': 'U', 'base': { '*k': 'K' }, 'discriminator': 'k', 'data': {} }", "discriminator 'k' must not be optional"),
        ("{ 'union': 'U', 'base': { 'k': 'str' }, 'discriminator': 'k', 'data': {} }", "discriminator 'k' must be an enum"),
        ("{ 'union': 'U', 'base': { 'k': 'K' }, 'discriminator': 'z', 'data': {} }", "discriminator 'z' is not a member of the base of 'U'"),
        ("{ 'union': 'U', 'base': { 'k': 'K' }, 'discriminator': 'k', 'data': { 'c': 'A' } }", "union 'U' has branch 'c', which is not a value of 'K'"),
        ("{ 'union': 'U', 'base': { 'k': 'K', 'x': 'int' }, 'discriminator': 'k', 'data': { 'a': 'A' } }", "member 'x' of branch 'a' collides with a member of the base of 'U'"),
        ("{ 'union': 'U', 'base': { 'k': 'K' }, 'discriminator': 'k', 'data': { 'a': 'K' } }", "branch 'a' of union 'U' must be a struct, not 'K'"),
        ("{ 'union': 'U', 'base': { 'k': 'K' }, 'discriminator': 'k', 'data': { 'a': 'A' } }\n{ 'command': 'c', 'data': 'U' }", "'c' takes union 'U' as its arguments and must be 'boxed': true"),
    ];
    for (src, want) in cases {
        let e = err(&format!("{pre}{src}"));
        assert!(e.ends_with(want), "{src}\n  got: {e}\n want: {want}");
    }
}

#[test]
fn load_applies_if_conditions() {
    let src = "{ 'pragma': { 'doc-required': false } }
{ 'enum': 'E', 'data': [ 'a', { 'name': 'b', 'if': 'CONFIG_B' } ] }
{ 'struct': 'S', 'data': { 'x': 'int', 'y': { 'type': 'int', 'if': { 'not': 'CONFIG_B' } } } }
{ 'command': 'only-b', 'if': { 'all': [ 'CONFIG_B', 'CONFIG_C' ] } }
{ 'command': 'any-b', 'if': { 'any': [ 'CONFIG_B', 'CONFIG_C' ] } }
";
    let without = load(&[("t.json", src)], &[]).unwrap();
    assert_eq!(without.enum_values("E").len(), 1);
    assert_eq!(without.struct_members("S").len(), 2);
    assert!(without.get("only-b").is_none());
    assert!(without.get("any-b").is_none());
    let with_b = load(&[("t.json", src)], &["CONFIG_B"]).unwrap();
    assert_eq!(with_b.enum_values("E").len(), 2);
    assert_eq!(with_b.struct_members("S").len(), 1);
    assert!(with_b.get("only-b").is_none());
    assert!(with_b.get("any-b").is_some());
}

#[test]
fn load_follows_includes_once() {
    let files = [
        ("main.json", "{ 'pragma': { 'doc-required': false } }\n{ 'include': 'a.json' }\n{ 'include': 'a.json' }\n{ 'command': 'c', 'returns': 'T' }\n"),
        ("a.json", "{ 'struct': 'T' }\n"),
    ];
    let s = load(&files, &[]).unwrap();
    assert_eq!(s.files, vec!["main.json", "a.json"]);
    assert!(s.get("T").is_some());
    let missing = [("main.json", "{ 'include': 'nope.json' }\n")];
    assert_eq!(
        load(&missing, &[]).unwrap_err(),
        "main.json:1: nope.json: no such file"
    );
}

#[test]
fn load_requires_documentation_of_everything() {
    let doc = |block: &str, def: &str| {
        format!("{{ 'pragma': {{ 'doc-required': true }} }}\n{block}{def}\n")
    };
    let good = doc(
        "##\n# @S:\n#\n# A thing.\n#\n# @a: A member.\n#\n# Features:\n#\n# @unstable: Experimental.\n#\n# Since: 1.0\n##\n",
        "{ 'struct': 'S', 'data': { 'a': 'int' }, 'features': [ 'unstable' ] }",
    );
    load(&[("t.json", &good)], &[]).unwrap();
    let cases = [
        (
            doc("", "{ 'struct': 'S' }"),
            "documentation comment required for 'S'",
        ),
        (
            doc("##\n# @T:\n#\n# Since: 1.0\n##\n", "{ 'struct': 'S' }"),
            "documentation block is for 'T' but the definition is 'S'",
        ),
        (
            doc("##\n# @S:\n#\n# Text.\n##\n", "{ 'struct': 'S' }"),
            "documentation of 'S' lacks a 'Since:' section",
        ),
        (
            doc(
                "##\n# @S:\n#\n# Since: 1.0\n##\n",
                "{ 'struct': 'S', 'data': { 'a': 'int' } }",
            ),
            "'a' of 'S' lacks documentation",
        ),
        (
            doc(
                "##\n# @S:\n#\n# @b: Nothing.\n#\n# Since: 1.0\n##\n",
                "{ 'struct': 'S' }",
            ),
            "documented '@b' is not a member of 'S'",
        ),
        (
            doc(
                "##\n# @S:\n#\n# Since: 1.0\n##\n",
                "{ 'struct': 'S', 'features': [ 'deprecated' ] }",
            ),
            "feature 'deprecated' of 'S' lacks documentation",
        ),
        (
            doc(
                "##\n# @E:\n#\n# @a: A.\n#\n# Since: 1.0\n##\n",
                "{ 'enum': 'E', 'data': [ 'a', 'b' ] }",
            ),
            "'b' of 'E' lacks documentation",
        ),
    ];
    for (src, want) in cases {
        let e = load(&[("t.json", &src)], &[]).unwrap_err();
        assert!(e.ends_with(want), "got: {e}\nwant: {want}");
    }
}

#[test]
fn load_dir_real_schema_is_valid_and_complete() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema");
    let s = load_dir(&dir, &|_| false).unwrap();
    for cmd in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-qmp-schema",
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "nbd-server-start",
        "nbd-server-stop",
        "block-export-add",
        "block-export-del",
        "query-block-exports",
        "quit",
    ] {
        assert!(
            matches!(s.get(cmd).map(|e| &e.kind), Some(Kind::Command(_))),
            "{cmd}"
        );
    }
    for ev in ["BLOCK_EXPORT_DELETED", "SHUTDOWN"] {
        assert!(
            matches!(s.get(ev).map(|e| &e.kind), Some(Kind::Event(_))),
            "{ev}"
        );
    }
}

#[test]
fn load_dir_refuses_a_file_that_is_not_included() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(MAIN_FILE),
        "{ 'pragma': { 'doc-required': false } }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("stray.json"), "").unwrap();
    let e = load_dir(dir.path(), &|_| false).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("stray.json: not included from sluice.json"),
        "{e}"
    );
}

#[test]
fn introspect_names_types_opaquely_and_marks_optional_members() {
    let s = one(
        "{ 'enum': 'E', 'data': [ 'x', { 'name': 'y', 'features': [ 'deprecated' ] } ] }
         { 'struct': 'R', 'data': { 'a': 'int8', '*e': 'E', 'l': [ 'str' ] } }
         { 'command': 'c', 'data': { 'r': 'R' }, 'returns': [ 'R' ], 'allow-oob': true }
         { 'event': 'EV' }",
    )
    .unwrap();
    let v = serde_json::Value::Array(introspect(&s));
    let expected = serde_json::json!([
        {"name": "c", "meta-type": "command", "arg-type": "0", "ret-type": "[1]", "allow-oob": true},
        {"name": "EV", "meta-type": "event", "arg-type": "2"},
        {"name": "0", "meta-type": "object", "members": [{"name": "r", "type": "1"}]},
        {"name": "1", "meta-type": "object", "members": [
            {"name": "a", "type": "int"},
            {"name": "e", "type": "3", "default": null},
            {"name": "l", "type": "[str]"}]},
        {"name": "[1]", "meta-type": "array", "element-type": "1"},
        {"name": "2", "meta-type": "object", "members": []},
        {"name": "int", "meta-type": "builtin", "json-type": "int"},
        {"name": "3", "meta-type": "enum", "members": [{"name": "x"}, {"name": "y", "features": ["deprecated"]}], "values": ["x", "y"]},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "[str]", "meta-type": "array", "element-type": "str"},
    ]);
    assert_eq!(v, expected);
}
