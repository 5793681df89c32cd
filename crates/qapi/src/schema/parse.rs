//! Reading QAPI schema files: the JSON-like expression syntax and `##` doc comment blocks.
//!
//! The syntax is QEMU's: top-level objects in `'single quotes'`, `#` comments, `true` and
//! `false`, no numbers or `null`, printable ASCII strings whose only escape is `\\`. The
//! reader is a plain loop over bytes in which every iteration consumes input or returns an
//! error, so no input can make it loop forever, and it nests at most [`MAX_DEPTH`] deep.
//! Every expression carries its line so that later checks can point at it.

use std::fmt;

/// Deepest nesting of `{`/`[` a schema may use (real schemas use 4).
pub const MAX_DEPTH: usize = 32;

/// A schema problem, with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// `file:line`
    pub at: String,
    pub message: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

impl std::error::Error for SchemaError {}

/// Where something is in the schema sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: String,
    pub line: u32,
}

impl Loc {
    pub fn error(&self, message: impl Into<String>) -> SchemaError {
        SchemaError {
            at: format!("{}:{}", self.file, self.line),
            message: message.into(),
        }
    }
}

/// A schema expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Str(String),
    Bool(bool),
    List(Vec<(u32, Expr)>),
    /// Keys in source order, each with its line.
    Dict(Vec<(String, u32, Expr)>),
}

impl Expr {
    /// What kind of expression this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Expr::Str(_) => "a string",
            Expr::Bool(_) => "a boolean",
            Expr::List(_) => "an array",
            Expr::Dict(_) => "an object",
        }
    }
}

/// A `##` documentation block.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Doc {
    /// The `@NAME:` the block documents, or None for a free-form block (section heading).
    pub symbol: Option<String>,
    /// Lines of text before the first section.
    pub body: Vec<String>,
    /// `@member: text` sections (members, enum values, branches), in order.
    pub args: Vec<(String, String)>,
    /// `@feature: text` sections after `Features:`.
    pub features: Vec<(String, String)>,
    /// The value of the `Since:` section.
    pub since: Option<String>,
    pub line: u32,
}

/// A top-level expression with its doc block and line.
#[derive(Debug, Clone, PartialEq)]
pub struct TopExpr {
    pub line: u32,
    pub expr: Expr,
    pub doc: Option<Doc>,
}

/// Parses one schema file's text.
pub fn parse_file(file: &str, text: &str) -> Result<Vec<TopExpr>, SchemaError> {
    let mut p = Reader {
        file,
        src: text.as_bytes(),
        pos: 0,
        line: 1,
        pending_doc: None,
    };
    let mut out = Vec::new();
    loop {
        p.skip_space_and_comments()?;
        if p.pos >= p.src.len() {
            if let Some(doc) = p.pending_doc.take() {
                if doc.symbol.is_some() {
                    return Err(
                        p.err_at(doc.line, "documentation block not followed by a definition")
                    );
                }
            }
            return Ok(out);
        }
        let line = p.line;
        if p.src[p.pos] != b'{' {
            return Err(p.err("expected '{' to start a top-level definition"));
        }
        let doc = p.pending_doc.take().filter(|d| d.symbol.is_some());
        let expr = p.value(0)?;
        out.push(TopExpr { line, expr, doc });
    }
}

struct Reader<'a> {
    file: &'a str,
    src: &'a [u8],
    pos: usize,
    line: u32,
    pending_doc: Option<Doc>,
}

impl Reader<'_> {
    fn err(&self, message: impl Into<String>) -> SchemaError {
        self.err_at(self.line, message)
    }

    fn err_at(&self, line: u32, message: impl Into<String>) -> SchemaError {
        SchemaError {
            at: format!("{}:{}", self.file, line),
            message: message.into(),
        }
    }

    /// Skips whitespace and comments; a `##` line at the start of a line begins a doc block,
    /// which is collected into `pending_doc`.
    fn skip_space_and_comments(&mut self) -> Result<(), SchemaError> {
        while self.pos < self.src.len() {
            match self.src[self.pos] {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => {
                    let at_line_start = self.pos == 0 || self.src[self.pos - 1] == b'\n';
                    let line = self.rest_of_line();
                    if at_line_start && line.trim_end() == "##" {
                        self.doc_block()?;
                    } else {
                        self.skip_line();
                    }
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn rest_of_line(&self) -> &str {
        let end = self.src[self.pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.src.len(), |n| self.pos + n);
        std::str::from_utf8(&self.src[self.pos..end]).unwrap_or("")
    }

    /// Moves past the current line, including its newline.
    fn skip_line(&mut self) {
        match self.src[self.pos..].iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                self.line += 1;
            }
            None => self.pos = self.src.len(),
        }
    }

    /// Reads a `##` ... `##` block; `pos` is at the opening `##`.
    fn doc_block(&mut self) -> Result<(), SchemaError> {
        let start = self.line;
        if let Some(prev) = &self.pending_doc {
            if prev.symbol.is_some() {
                return Err(self.err_at(
                    prev.line,
                    "documentation block not followed by a definition",
                ));
            }
        }
        self.skip_line();
        let mut lines = Vec::new();
        loop {
            if self.pos >= self.src.len() {
                return Err(self.err_at(start, "unterminated documentation block"));
            }
            let raw = self.rest_of_line().trim_end().to_string();
            if raw == "##" {
                self.skip_line();
                break;
            }
            let text = if raw == "#" {
                String::new()
            } else if let Some(t) = raw.strip_prefix("# ") {
                t.to_string()
            } else {
                return Err(self.err("documentation comment lines must start with '# '"));
            };
            lines.push((self.line, text));
            self.skip_line();
        }
        self.pending_doc = Some(parse_doc(self.file, start, &lines)?);
        Ok(())
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn value(&mut self, depth: usize) -> Result<Expr, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("nesting deeper than {MAX_DEPTH}")));
        }
        self.skip_space_and_comments()?;
        match self.peek() {
            None => Err(self.err("unexpected end of file")),
            Some(b'{') => {
                self.pos += 1;
                let mut entries: Vec<(String, u32, Expr)> = Vec::new();
                self.skip_space_and_comments()?;
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Ok(Expr::Dict(entries));
                }
                loop {
                    self.skip_space_and_comments()?;
                    let line = self.line;
                    if self.peek() != Some(b'\'') {
                        return Err(self.err("expected a string key"));
                    }
                    let key = self.string()?;
                    if entries.iter().any(|(k, _, _)| *k == key) {
                        return Err(self.err(format!("duplicate key '{key}'")));
                    }
                    self.skip_space_and_comments()?;
                    if self.peek() != Some(b':') {
                        return Err(self.err("expected ':'"));
                    }
                    self.pos += 1;
                    let v = self.value(depth + 1)?;
                    entries.push((key, line, v));
                    self.skip_space_and_comments()?;
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(Expr::Dict(entries));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_space_and_comments()?;
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(Expr::List(items));
                }
                loop {
                    self.skip_space_and_comments()?;
                    let line = self.line;
                    items.push((line, self.value(depth + 1)?));
                    self.skip_space_and_comments()?;
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Expr::List(items));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            Some(b'\'') => Ok(Expr::Str(self.string()?)),
            Some(c) if c.is_ascii_lowercase() => {
                let end = self.src[self.pos..]
                    .iter()
                    .position(|b| !b.is_ascii_alphanumeric())
                    .map_or(self.src.len(), |n| self.pos + n);
                let word = std::str::from_utf8(&self.src[self.pos..end]).unwrap_or("");
                let v = match word {
                    "true" => Expr::Bool(true),
                    "false" => Expr::Bool(false),
                    _ => return Err(self.err(format!("stray '{word}'"))),
                };
                self.pos = end;
                Ok(v)
            }
            Some(c) => Err(self.err(format!(
                "stray '{}'",
                String::from_utf8_lossy(&[c]).escape_default()
            ))),
        }
    }

    /// A single-quoted string; `pos` is at the opening quote.
    fn string(&mut self) -> Result<String, SchemaError> {
        self.pos += 1;
        let mut s = String::new();
        loop {
            match self.peek() {
                None | Some(b'\n') => return Err(self.err("missing terminating \"'\"")),
                Some(b'\'') => {
                    self.pos += 1;
                    return Ok(s);
                }
                Some(b'\\') => {
                    if self.src.get(self.pos + 1) != Some(&b'\\') {
                        return Err(self.err("unknown escape (only \\\\ is allowed)"));
                    }
                    s.push('\\');
                    self.pos += 2;
                }
                Some(c) if (0x20..0x7F).contains(&c) => {
                    s.push(c as char);
                    self.pos += 1;
                }
                Some(c) => {
                    return Err(self.err(format!(
                        "funny character 0x{c:02x} in string (only printable ASCII)"
                    )))
                }
            }
        }
    }
}

const TAGS: &[&str] = &[
    "Since", "Returns", "Errors", "TODO", "Note", "Notes", "Example", "Examples", "Features",
];

/// Splits a doc block's lines into sections.
fn parse_doc(file: &str, line: u32, lines: &[(u32, String)]) -> Result<Doc, SchemaError> {
    let mut doc = Doc {
        line,
        ..Doc::default()
    };
    let mut it = lines.iter().peekable();
    // A symbol block starts with "@NAME:" alone on its first line.
    if let Some((_, first)) = it.peek() {
        if let Some(rest) = first.strip_prefix('@') {
            let name = rest.strip_suffix(':').ok_or_else(|| SchemaError {
                at: format!("{file}:{line}"),
                message: "a documentation block's first line must be '@NAME:'".into(),
            })?;
            doc.symbol = Some(name.to_string());
            it.next();
        }
    }
    #[derive(PartialEq)]
    enum Sec {
        Body,
        /// After `Features:`, before the first feature.
        Nothing,
        Arg,
        Feature,
        Tag(String),
    }
    let mut sec = Sec::Body;
    let mut in_features = false;
    for (ln, text) in it {
        let err = |m: String| SchemaError {
            at: format!("{file}:{ln}"),
            message: m,
        };
        if let Some(rest) = text.strip_prefix('@') {
            if let Some((name, desc)) = rest.split_once(':') {
                if !name.is_empty() && !name.contains(' ') {
                    let entry = (name.to_string(), desc.trim().to_string());
                    if in_features {
                        if doc.features.iter().any(|(n, _)| n == name) {
                            return Err(err(format!(
                                "duplicate documentation of feature '{name}'"
                            )));
                        }
                        doc.features.push(entry);
                        sec = Sec::Feature;
                    } else {
                        if doc.args.iter().any(|(n, _)| n == name) {
                            return Err(err(format!("duplicate documentation of '@{name}'")));
                        }
                        doc.args.push(entry);
                        sec = Sec::Arg;
                    }
                    continue;
                }
            }
        }
        if let Some((tag, rest)) = text.split_once(':') {
            if TAGS.contains(&tag) {
                if tag == "Features" {
                    if !rest.trim().is_empty() {
                        return Err(err("'Features:' must be alone on its line".into()));
                    }
                    in_features = true;
                    sec = Sec::Nothing;
                    continue;
                }
                if tag == "Since" {
                    if doc.since.is_some() {
                        return Err(err("duplicate 'Since:' section".into()));
                    }
                    doc.since = Some(rest.trim().to_string());
                }
                sec = Sec::Tag(tag.to_string());
                continue;
            }
        }
        match &sec {
            Sec::Body => doc.body.push(text.clone()),
            Sec::Nothing => {}
            Sec::Arg => append(&mut doc.args, text),
            Sec::Feature => append(&mut doc.features, text),
            Sec::Tag(t) if t == "Since" && doc.since.as_deref() == Some("") => {
                doc.since = Some(text.trim().to_string());
            }
            Sec::Tag(_) => {}
        }
    }
    if doc.since.as_deref() == Some("") {
        return Err(SchemaError {
            at: format!("{file}:{line}"),
            message: "'Since:' section is empty".into(),
        });
    }
    Ok(doc)
}

fn append(sections: &mut [(String, String)], text: &str) {
    if let Some((_, desc)) = sections.last_mut() {
        let t = text.trim();
        if !t.is_empty() {
            if !desc.is_empty() {
                desc.push(' ');
            }
            desc.push_str(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> TopExpr {
        let mut v = parse_file("t.json", text).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    #[test]
    fn parse_file_reads_nested_expression_with_lines() {
        let t = one(
            "# comment\n{ 'struct': 'S',\n  'data': { 'a': 'int', '*b': ['str'] }, 'x': true }\n",
        );
        assert_eq!(t.line, 2);
        let Expr::Dict(entries) = &t.expr else {
            panic!()
        };
        assert_eq!(entries[0].0, "struct");
        assert_eq!(entries[1].1, 3);
        assert_eq!(entries[2].2, Expr::Bool(true));
    }

    #[test]
    fn parse_file_attaches_symbol_doc_block() {
        let t = one(
            "##\n# @S:\n#\n# A struct.\n#\n# @a: first\n#     continued\n#\n# Features:\n#\n# @deprecated: old\n#\n# Since: 1.2\n##\n{ 'struct': 'S', 'data': { 'a': 'int' } }\n",
        );
        let doc = t.doc.unwrap();
        assert_eq!(doc.symbol.as_deref(), Some("S"));
        assert_eq!(doc.body, vec!["", "A struct.", ""]);
        assert_eq!(doc.args, vec![("a".into(), "first continued".into())]);
        assert_eq!(doc.features, vec![("deprecated".into(), "old".into())]);
        assert_eq!(doc.since.as_deref(), Some("1.2"));
    }

    #[test]
    fn parse_file_free_form_doc_block_is_not_attached() {
        let t = one("##\n# = Section\n##\n\n{ 'include': 'x.json' }\n");
        assert!(t.doc.is_none());
    }

    #[test]
    fn parse_file_errors_name_file_and_line() {
        let cases = [
            ("{ 'a': 1 }", "t.json:1: stray '1'"),
            ("{ \"a\": 'b' }", "t.json:1: expected a string key"),
            ("{ 'a': 'b',\n 'a': 'c' }", "t.json:2: duplicate key 'a'"),
            ("{ 'a': 'b\n' }", "t.json:1: missing terminating \"'\""),
            ("{ 'a': null }", "t.json:1: stray 'null'"),
            (
                "{ 'a': 'x\\y' }",
                "t.json:1: unknown escape (only \\\\ is allowed)",
            ),
            ("{ 'a': [ 'b' }", "t.json:1: expected ',' or ']'"),
            ("{ 'a': 'b' ", "t.json:1: expected ',' or '}'"),
            (
                "'top'",
                "t.json:1: expected '{' to start a top-level definition",
            ),
            ("##\n# @S:\n", "t.json:1: unterminated documentation block"),
            (
                "##\n# @S:\n##\n",
                "t.json:1: documentation block not followed by a definition",
            ),
            (
                "##\n#x\n##\n",
                "t.json:2: documentation comment lines must start with '# '",
            ),
        ];
        for (text, want) in cases {
            let e = parse_file("t.json", text).unwrap_err();
            assert_eq!(e.to_string(), want, "{text:?}");
        }
    }

    #[test]
    fn parse_file_deep_nesting_is_an_error_not_a_crash() {
        let text = format!("{{ 'a': {}'x'{} }}", "[".repeat(5000), "]".repeat(5000));
        let e = parse_file("t.json", &text).unwrap_err();
        assert_eq!(e.message, "nesting deeper than 32");
    }

    #[test]
    fn parse_file_truncated_inputs_always_end() {
        let text = "##\n# @S:\n# Since: 1.0\n##\n{ 'struct': 'S', 'data': { 'a': [ 'int' ], 'b': true } }\n";
        for cut in 0..text.len() {
            let _ = parse_file("t.json", &text[..cut]);
        }
    }
}
