//! QEMU's JSON dialect, read as a stream: bytes in, complete JSON values (or errors) out.
//!
//! QMP input is not line-delimited. QEMU lexes the byte stream into tokens, counts braces and
//! brackets, and parses a message as soon as they balance, so an object may arrive in several
//! reads and several objects may share one line. This module reproduces that pipeline
//! (`qobject/json-lexer.c`, `json-streamer.c`, `json-parser.c` in QEMU 10) and its messages,
//! because clients and their tests see them:
//!
//! - the lexer accepts `'single-quoted'` strings and the `\'` escape; bytes that cannot start
//!   or continue a token give `JSON parse error, stray '...'` and put the lexer in *recovery*,
//!   skipping input up to a structural character or an ASCII control character (the documented
//!   way for a client to reset the parser is to send 0x01);
//! - the parser gives QEMU's messages: `expecting value`, `invalid keyword 'x'`,
//!   `key is not a string in object`, `missing : in object pair`, `expected separator in
//!   dict`/`list`, `duplicate key`, `invalid escape sequence in string`, `\uXXXX is not a valid
//!   Unicode character`, `invalid UTF-8 sequence in string`;
//! - each message is limited in bytes, tokens and nesting depth ([`Limits`], QEMU's values by
//!   default).
//!
//! One deliberate difference: when a message exceeds a limit, QEMU resets and then parses the
//! rest of that message as new input, answering every leftover token with an error (1025 `]`
//! gave about a thousand replies). Here the rest of the oversized message is skipped — still
//! lexed, so that strings and nesting are followed, but not stored — and the client gets exactly
//! one error. Memory stays bounded by the limits whatever the client sends.
//!
//! Tokens of the message being read are kept as offsets into one byte buffer, so a message
//! costs one copy of its bytes plus 24 bytes per token until it is parsed.

use serde_json::{Map, Number, Value};

/// Per-message limits. A message is everything from its first token to the token that
/// balances its braces and brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of tokens (strings with their quotes and escapes as sent).
    pub max_bytes: usize,
    /// Most tokens.
    pub max_tokens: usize,
    /// Most open braces and brackets at once.
    pub max_depth: usize,
}

impl Default for Limits {
    /// QEMU's limits: 64 MiB, 2 Mi tokens, depth 1024.
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 20,
            max_tokens: 2 << 20,
            max_depth: 1024,
        }
    }
}

/// Why input did not make a value. The `Display` text is QEMU's error `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The tokens do not form a JSON value.
    #[error("JSON parse error, {0}")]
    Syntax(String),
    /// Bytes that are not a token (the text of the bad token, lossily decoded).
    #[error("JSON parse error, stray '{0}'")]
    Stray(String),
    #[error("JSON token size limit exceeded")]
    TooLarge,
    #[error("JSON token count limit exceeded")]
    TooManyTokens,
    #[error("JSON nesting depth limit exceeded")]
    TooDeep,
}

/// What [`JsonStream::feed`] produces for each message: a value or the reason there is none.
pub type Parsed = Result<Value, JsonError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Str,
    Int,
    Float,
    Keyword,
}

#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Tok,
    start: usize,
    end: usize,
}

/// Lexer states, named after QEMU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    Dq,
    DqEsc,
    Sq,
    SqEsc,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one lexer step did with the byte.
enum Step {
    /// Consumed, stay in (or move to) a state.
    Next(State),
    /// Consumed; it completes a token.
    Emit(Tok),
    /// Not consumed; the token before it is complete (the byte is read again from `Start`).
    EmitBefore(Tok),
    /// Not consumed; go back to `Start` and read it there.
    Restart,
    /// Consumed; it makes the current token invalid.
    Error,
    /// Consumed and dropped (whitespace, recovery).
    Skip(State),
}

/// A JSON stream reader with QEMU's behaviour. Feed it bytes as they arrive.
#[derive(Debug)]
pub struct JsonStream {
    limits: Limits,
    state: State,
    /// Bytes of this message's tokens, and of the token being lexed (from `tok_start`).
    text: Vec<u8>,
    tok_start: usize,
    tokens: Vec<Token>,
    brace: i64,
    bracket: i64,
    /// A limit was hit: lex, count nesting, store nothing, until the message ends.
    discarding: bool,
}

impl Default for JsonStream {
    fn default() -> Self {
        JsonStream::new(Limits::default())
    }
}

/// Buffers larger than this are released after a message, so one big message does not pin
/// its memory for the life of the connection.
const KEEP_CAPACITY: usize = 1 << 20;

impl JsonStream {
    pub fn new(limits: Limits) -> JsonStream {
        JsonStream {
            limits,
            state: State::Start,
            text: Vec::new(),
            tok_start: 0,
            tokens: Vec::new(),
            brace: 0,
            bracket: 0,
            discarding: false,
        }
    }

    /// True if no partial message is held (only whitespace since the last message).
    pub fn is_idle(&self) -> bool {
        self.state == State::Start && self.tokens.is_empty() && !self.discarding
    }

    /// Reads `input`, appending one entry to `out` for every message it completes.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Parsed>) {
        let mut i = 0;
        while i < input.len() {
            if let State::Dq | State::Sq = self.state {
                // Fast path through the body of a string: everything up to a quote, a
                // backslash or a byte that cannot appear in a string.
                let quote = if self.state == State::Dq { b'"' } else { b'\'' };
                let run = input[i..]
                    .iter()
                    .position(|&b| b == quote || b == b'\\' || !(0x20..=0xFD).contains(&b))
                    .unwrap_or(input.len() - i);
                if run > 0 {
                    self.append(&input[i..i + run], out);
                    i += run;
                    continue;
                }
            }
            if self.step(input[i], out) {
                i += 1;
            }
        }
    }

    /// End of input: a pending number or keyword is complete, a partial message is an error
    /// (QEMU's `premature EOI`). The stream is then ready for new input.
    pub fn finish(&mut self, out: &mut Vec<Parsed>) {
        match self.state {
            State::Zero | State::Digits => self.token(Tok::Int, out),
            State::MantissaDigits | State::ExpDigits => self.token(Tok::Float, out),
            State::Keyword => self.token(Tok::Keyword, out),
            State::Start | State::Recovery => {}
            _ => self.lex_error(out),
        }
        self.state = State::Start;
        if !self.tokens.is_empty() && !self.discarding {
            let r = self.parse();
            out.push(r);
        }
        self.reset();
    }

    /// Feeds one byte; returns whether it was consumed.
    fn step(&mut self, b: u8, out: &mut Vec<Parsed>) -> bool {
        let step = self.transition(b);
        match step {
            Step::Next(s) => {
                if self.state == State::Start {
                    self.tok_start = self.text.len();
                }
                self.append(&[b], out);
                self.state = s;
                true
            }
            Step::Emit(kind) => {
                if self.state == State::Start {
                    self.tok_start = self.text.len();
                }
                self.append(&[b], out);
                self.state = State::Start;
                self.token(kind, out);
                true
            }
            Step::EmitBefore(kind) => {
                self.state = State::Start;
                self.token(kind, out);
                false
            }
            Step::Restart => {
                self.state = State::Start;
                false
            }
            Step::Error => {
                if self.state == State::Start {
                    self.tok_start = self.text.len();
                }
                self.append(&[b], out);
                self.lex_error(out);
                true
            }
            Step::Skip(s) => {
                self.state = s;
                true
            }
        }
    }

    /// QEMU's lexer table: what byte `b` does in the current state.
    fn transition(&self, b: u8) -> Step {
        use State as S;
        let ascii_end = b < 0x80;
        match self.state {
            S::Start => match b {
                b'"' => Step::Next(S::Dq),
                b'\'' => Step::Next(S::Sq),
                b'0' => Step::Next(S::Zero),
                b'1'..=b'9' => Step::Next(S::Digits),
                b'-' => Step::Next(S::Sign),
                b'a'..=b'z' => Step::Next(S::Keyword),
                b'{' => Step::Emit(Tok::LCurly),
                b'}' => Step::Emit(Tok::RCurly),
                b'[' => Step::Emit(Tok::LSquare),
                b']' => Step::Emit(Tok::RSquare),
                b',' => Step::Emit(Tok::Comma),
                b':' => Step::Emit(Tok::Colon),
                b' ' | b'\t' | b'\r' | b'\n' => Step::Skip(S::Start),
                _ => Step::Error,
            },
            S::Recovery => match b {
                b'\t' => Step::Skip(S::Recovery),
                0..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' => Step::Restart,
                _ => Step::Skip(S::Recovery),
            },
            S::Dq | S::Sq => {
                let quote = if self.state == S::Dq { b'"' } else { b'\'' };
                match b {
                    _ if b == quote => Step::Emit(Tok::Str),
                    b'\\' => Step::Next(if self.state == S::Dq {
                        S::DqEsc
                    } else {
                        S::SqEsc
                    }),
                    0x20..=0xFD => Step::Next(self.state),
                    _ => Step::Error,
                }
            }
            S::DqEsc | S::SqEsc => match b {
                0x20..=0xFD => Step::Next(if self.state == S::DqEsc { S::Dq } else { S::Sq }),
                _ => Step::Error,
            },
            S::Zero => match b {
                b'0'..=b'9' => Step::Error,
                b'.' => Step::Next(S::Mantissa),
                _ if ascii_end => Step::EmitBefore(Tok::Int),
                _ => Step::Error,
            },
            S::Sign => match b {
                b'0' => Step::Next(S::Zero),
                b'1'..=b'9' => Step::Next(S::Digits),
                _ => Step::Error,
            },
            S::Digits => match b {
                b'0'..=b'9' => Step::Next(S::Digits),
                b'e' | b'E' => Step::Next(S::ExpE),
                b'.' => Step::Next(S::Mantissa),
                _ if ascii_end => Step::EmitBefore(Tok::Int),
                _ => Step::Error,
            },
            S::Mantissa => match b {
                b'0'..=b'9' => Step::Next(S::MantissaDigits),
                _ => Step::Error,
            },
            S::MantissaDigits => match b {
                b'0'..=b'9' => Step::Next(S::MantissaDigits),
                b'e' | b'E' => Step::Next(S::ExpE),
                _ if ascii_end => Step::EmitBefore(Tok::Float),
                _ => Step::Error,
            },
            S::ExpE => match b {
                b'+' | b'-' => Step::Next(S::ExpSign),
                b'0'..=b'9' => Step::Next(S::ExpDigits),
                _ => Step::Error,
            },
            S::ExpSign => match b {
                b'0'..=b'9' => Step::Next(S::ExpDigits),
                _ => Step::Error,
            },
            S::ExpDigits => match b {
                b'0'..=b'9' => Step::Next(S::ExpDigits),
                _ if ascii_end => Step::EmitBefore(Tok::Float),
                _ => Step::Error,
            },
            S::Keyword => match b {
                b'a'..=b'z' => Step::Next(S::Keyword),
                _ if ascii_end => Step::EmitBefore(Tok::Keyword),
                _ => Step::Error,
            },
        }
    }

    /// Appends bytes of the current token, enforcing the size limit as it grows.
    fn append(&mut self, bytes: &[u8], out: &mut Vec<Parsed>) {
        if self.discarding {
            return;
        }
        // Checked before growing, so the buffer never holds more than the limit.
        if self.text.len() + bytes.len() > self.limits.max_bytes {
            self.start_discarding(JsonError::TooLarge, out);
            return;
        }
        self.text.extend_from_slice(bytes);
    }

    /// A limit was hit: report it once and skip the rest of this message.
    fn start_discarding(&mut self, err: JsonError, out: &mut Vec<Parsed>) {
        out.push(Err(err));
        self.discarding = true;
        self.text = Vec::new();
        self.tokens = Vec::new();
        self.tok_start = 0;
    }

    fn lex_error(&mut self, out: &mut Vec<Parsed>) {
        if !self.discarding {
            let bad = String::from_utf8_lossy(&self.text[self.tok_start..]).into_owned();
            out.push(Err(JsonError::Stray(bad)));
            self.reset();
        }
        self.state = State::Recovery;
    }

    /// The streamer: a token is complete.
    fn token(&mut self, kind: Tok, out: &mut Vec<Parsed>) {
        match kind {
            Tok::LCurly => self.brace += 1,
            Tok::RCurly => self.brace -= 1,
            Tok::LSquare => self.bracket += 1,
            Tok::RSquare => self.bracket -= 1,
            _ => {}
        }
        let open = (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0;
        if self.discarding {
            if !open {
                self.reset();
            }
            return;
        }
        if self.tokens.len() + 1 > self.limits.max_tokens {
            return self.start_discarding(JsonError::TooManyTokens, out);
        }
        if self.brace + self.bracket > self.limits.max_depth as i64 {
            return self.start_discarding(JsonError::TooDeep, out);
        }
        self.tokens.push(Token {
            kind,
            start: self.tok_start,
            end: self.text.len(),
        });
        self.tok_start = self.text.len();
        if open {
            return;
        }
        let r = self.parse();
        out.push(r);
        self.reset();
    }

    /// Forgets the current message (keeps the lexer state).
    fn reset(&mut self) {
        self.brace = 0;
        self.bracket = 0;
        self.discarding = false;
        self.tok_start = 0;
        self.text.clear();
        self.tokens.clear();
        if self.text.capacity() > KEEP_CAPACITY {
            self.text = Vec::new();
        }
        if self.tokens.capacity() > KEEP_CAPACITY / std::mem::size_of::<Token>() {
            self.tokens = Vec::new();
        }
    }

    fn parse(&self) -> Parsed {
        let mut p = Parser {
            text: &self.text,
            tokens: &self.tokens,
            pos: 0,
        };
        p.value().map_err(JsonError::Syntax)
    }
}

/// Recursive descent over one message's tokens. Depth is bounded by the streamer's limit.
struct Parser<'a> {
    text: &'a [u8],
    tokens: &'a [Token],
    pos: usize,
}

type PResult<T> = Result<T, String>;

impl Parser<'_> {
    fn peek(&self) -> PResult<Token> {
        self.tokens
            .get(self.pos)
            .copied()
            .ok_or_else(|| "premature EOI".to_string())
    }

    fn next(&mut self) -> PResult<Token> {
        let t = self.peek()?;
        self.pos += 1;
        Ok(t)
    }

    fn bytes(&self, t: Token) -> &[u8] {
        &self.text[t.start..t.end]
    }

    fn value(&mut self) -> PResult<Value> {
        let t = self.peek()?;
        match t.kind {
            Tok::LCurly => self.object(),
            Tok::LSquare => self.array(),
            Tok::Str => {
                self.pos += 1;
                decode_string(self.bytes(t)).map(Value::String)
            }
            Tok::Int | Tok::Float => {
                self.pos += 1;
                number(self.bytes(t), t.kind == Tok::Int).map(Value::Number)
            }
            Tok::Keyword => {
                self.pos += 1;
                match self.bytes(t) {
                    b"true" => Ok(Value::Bool(true)),
                    b"false" => Ok(Value::Bool(false)),
                    b"null" => Ok(Value::Null),
                    other => Err(format!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(other)
                    )),
                }
            }
            _ => Err("expecting value".to_string()),
        }
    }

    fn object(&mut self) -> PResult<Value> {
        self.next()?; // '{'
        let mut map = Map::new();
        if self.peek()?.kind == Tok::RCurly {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let key = match self.value()? {
                Value::String(s) => s,
                _ => return Err("key is not a string in object".to_string()),
            };
            if self.next()?.kind != Tok::Colon {
                return Err("missing : in object pair".to_string());
            }
            let value = self.value()?;
            if map.contains_key(&key) {
                return Err("duplicate key".to_string());
            }
            map.insert(key, value);
            match self.next()?.kind {
                Tok::RCurly => return Ok(Value::Object(map)),
                Tok::Comma => {}
                _ => return Err("expected separator in dict".to_string()),
            }
        }
    }

    fn array(&mut self) -> PResult<Value> {
        self.next()?; // '['
        let mut list = Vec::new();
        if self.peek()?.kind == Tok::RSquare {
            self.pos += 1;
            return Ok(Value::Array(list));
        }
        loop {
            list.push(self.value()?);
            match self.next()?.kind {
                Tok::RSquare => return Ok(Value::Array(list)),
                Tok::Comma => {}
                _ => return Err("expected separator in list".to_string()),
            }
        }
    }
}

/// A number token as QEMU reads it: a 64-bit signed integer if it fits, else unsigned, else a
/// double.
fn number(text: &[u8], integer: bool) -> PResult<Number> {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' through.
    let s = std::str::from_utf8(text).map_err(|_| "expecting value".to_string())?;
    if integer {
        if let Ok(i) = s.parse::<i64>() {
            return Ok(Number::from(i));
        }
        if let Ok(u) = s.parse::<u64>() {
            return Ok(Number::from(u));
        }
    }
    let f: f64 = s.parse().map_err(|_| "expecting value".to_string())?;
    Number::from_f64(f).ok_or_else(|| format!("number '{s}' is out of range"))
}

/// Decodes a string token (with its quotes) the way QEMU's `parse_string` does.
fn decode_string(tok: &[u8]) -> PResult<String> {
    // Error texts quote the escape as QEMU does: `\u` and the four bytes after it, read from
    // the token (so a short escape shows the closing quote).
    let body = &tok[1..tok.len() - 1];
    let mut out = String::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let run = body[i..]
            .iter()
            .position(|&b| b == b'\\')
            .unwrap_or(body.len() - i);
        if run > 0 {
            let s = std::str::from_utf8(&body[i..i + run])
                .map_err(|_| "invalid UTF-8 sequence in string".to_string())?;
            out.push_str(s);
            i += run;
            continue;
        }
        // body[i] is a backslash; the lexer guarantees a byte follows it.
        let c = body[i + 1];
        i += 2;
        match c {
            b'"' => out.push('"'),
            b'\'' => out.push('\''),
            b'\\' => out.push('\\'),
            b'/' => out.push('/'),
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let at = i - 2;
                let bad = || {
                    let end = (at + 7).min(tok.len());
                    format!(
                        "{} is not a valid Unicode character",
                        String::from_utf8_lossy(&tok[at + 1..end])
                    )
                };
                let hi = hex4(&body[i..]).ok_or_else(bad)?;
                i += 4;
                let cp = match hi {
                    0xD800..=0xDBFF => {
                        let lo = (body.get(i) == Some(&b'\\') && body.get(i + 1) == Some(&b'u'))
                            .then(|| hex4(&body[i + 2..]))
                            .flatten()
                            .filter(|lo| (0xDC00..=0xDFFF).contains(lo))
                            .ok_or_else(bad)?;
                        i += 6;
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(bad()),
                    _ => hi,
                };
                out.push(char::from_u32(cp).ok_or_else(bad)?);
            }
            _ => return Err("invalid escape sequence in string".to_string()),
        }
    }
    Ok(out)
}

fn hex4(b: &[u8]) -> Option<u32> {
    if b.len() < 4 {
        return None;
    }
    b[..4].iter().try_fold(0u32, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some(acc * 16 + d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed_all(input: &[u8]) -> Vec<Parsed> {
        let mut s = JsonStream::default();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn errors(input: &[u8]) -> Vec<String> {
        feed_all(input)
            .into_iter()
            .map(|r| match r {
                Ok(v) => format!("ok {v}"),
                Err(e) => e.to_string(),
            })
            .collect()
    }

    #[test]
    fn feed_two_objects_on_one_line_yields_both() {
        let out = feed_all(br#"{"a": 1}{"b": [true, null]}"#);
        assert_eq!(
            out,
            vec![Ok(json!({"a": 1})), Ok(json!({"b": [true, null]}))]
        );
    }

    #[test]
    fn feed_object_split_across_calls_yields_it_once_complete() {
        let mut s = JsonStream::default();
        let mut out = Vec::new();
        s.feed(b"{\"execute\": \"query-", &mut out);
        s.feed(b"version\"", &mut out);
        assert!(out.is_empty());
        assert!(!s.is_idle());
        s.feed(b"}", &mut out);
        assert_eq!(out, vec![Ok(json!({"execute": "query-version"}))]);
        assert!(s.is_idle());
    }

    #[test]
    fn feed_every_split_point_gives_the_same_value() {
        let input = br#"{'execute': 'x', "id": [1, -2.5e3, "\u00e9\ud83d\ude00", {}], "t": false}"#;
        let whole = feed_all(input);
        assert_eq!(whole.len(), 1);
        for cut in 0..input.len() {
            let mut s = JsonStream::default();
            let mut out = Vec::new();
            s.feed(&input[..cut], &mut out);
            s.feed(&input[cut..], &mut out);
            assert_eq!(out, whole, "cut at {cut}");
        }
    }

    #[test]
    fn feed_single_quotes_and_escapes_decode() {
        let out = feed_all(br#"{'s': 'it\'s "q"', "d": "a\'b\/c\n\t\u0041"}"#);
        assert_eq!(out, vec![Ok(json!({"s": "it's \"q\"", "d": "a'b/c\n\tA"}))]);
    }

    #[test]
    fn feed_numbers_take_qemu_types() {
        let out = feed_all(b"[0, -1, 9223372036854775808, -9223372036854775809, 1.5, 2e3]");
        let v = out[0].as_ref().unwrap();
        assert_eq!(v[0].as_i64(), Some(0));
        assert_eq!(v[1].as_i64(), Some(-1));
        assert_eq!(v[2].as_u64(), Some(9223372036854775808));
        assert!(v[3].is_f64());
        assert_eq!(v[4].as_f64(), Some(1.5));
        assert_eq!(v[5].as_f64(), Some(2000.0));
    }

    #[test]
    fn feed_top_level_number_waits_for_a_terminator() {
        let mut s = JsonStream::default();
        let mut out = Vec::new();
        s.feed(b"12", &mut out);
        assert!(out.is_empty());
        s.feed(b" ", &mut out);
        assert_eq!(out, vec![Ok(json!(12))]);
    }

    #[test]
    fn feed_garbage_words_give_one_error_each() {
        assert_eq!(
            errors(b"this is not json\n"),
            vec![
                "JSON parse error, invalid keyword 'this'",
                "JSON parse error, invalid keyword 'is'",
                "JSON parse error, invalid keyword 'not'",
                "JSON parse error, invalid keyword 'json'",
            ]
        );
    }

    #[test]
    fn feed_syntax_errors_match_qemu_messages() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"a" 1}"#, "JSON parse error, missing : in object pair"),
            (
                br#"{1:2}"#,
                "JSON parse error, key is not a string in object",
            ),
            (
                br#"{"a":1 "b":2}"#,
                "JSON parse error, expected separator in dict",
            ),
            (br#"[1 2]"#, "JSON parse error, expected separator in list"),
            (br#"{"a":}"#, "JSON parse error, expecting value"),
            (br#"[1,]"#, "JSON parse error, expecting value"),
            (
                br#"{"a":1]"#,
                "JSON parse error, expected separator in dict",
            ),
            (br#"[}"#, "JSON parse error, expecting value"),
            (br#"{"a":1,"a":2}"#, "JSON parse error, duplicate key"),
            (
                br#"{"a":"\q"}"#,
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                br#"{"a":"\uzzzz"}"#,
                "JSON parse error, \\uzzzz is not a valid Unicode character",
            ),
            (
                br#"["\u12"]"#,
                "JSON parse error, \\u12\" is not a valid Unicode character",
            ),
            (
                br#"["\ud800\u0041"]"#,
                "JSON parse error, \\ud800 is not a valid Unicode character",
            ),
            (
                br#"["\udc00"]"#,
                "JSON parse error, \\udc00 is not a valid Unicode character",
            ),
            (
                b"[\"\xc3\"]",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (b"tru ", "JSON parse error, invalid keyword 'tru'"),
        ];
        for (input, want) in cases {
            assert_eq!(errors(input), vec![want.to_string()], "{input:?}");
        }
    }

    #[test]
    fn feed_lexical_errors_report_the_stray_token() {
        assert_eq!(errors(b"01"), vec!["JSON parse error, stray '01'"]);
        assert_eq!(errors(b"1.5e "), vec!["JSON parse error, stray '1.5e '"]);
        assert_eq!(errors(b"-\n"), vec!["JSON parse error, stray '-\n'"]);
        assert_eq!(errors(b"@"), vec!["JSON parse error, stray '@'"]);
        assert_eq!(errors(b"\"\x01"), vec!["JSON parse error, stray '\"\u{1}'"]);
    }

    #[test]
    fn feed_error_inside_object_recovers_at_structural_character() {
        // QEMU: the stray byte resets the message; the closing brace is then a message of
        // its own.
        assert_eq!(
            errors(br#"{"a":@}"#),
            vec![
                "JSON parse error, stray '@'",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn feed_control_character_resets_an_unterminated_string() {
        let mut s = JsonStream::default();
        let mut out = Vec::new();
        s.feed(
            b"{\"execute\": \"query-jobs\", \"id\": \"unterminated\n",
            &mut out,
        );
        s.feed(b"\x01{\"execute\": \"query-jobs\"}", &mut out);
        let got: Vec<_> = out
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                Err("JSON parse error, stray '\"unterminated\n'".to_string()),
                Err("JSON parse error, stray '\u{1}'".to_string()),
                Ok(json!({"execute": "query-jobs"})),
            ]
        );
    }

    #[test]
    fn feed_stray_closer_is_expecting_value() {
        assert_eq!(
            errors(b"}}"),
            vec![
                "JSON parse error, expecting value",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn feed_nesting_beyond_limit_gives_one_error_then_recovers() {
        let mut input = b"{\"execute\": \"x\", \"arguments\": {\"x\": ".to_vec();
        input.extend(std::iter::repeat_n(b'[', 2000));
        input.extend(std::iter::repeat_n(b']', 2000));
        input.extend_from_slice(b"}}{\"execute\": \"after\"}");
        assert_eq!(
            errors(&input),
            vec![
                "JSON nesting depth limit exceeded".to_string(),
                "ok {\"execute\":\"after\"}".to_string()
            ]
        );
    }

    #[test]
    fn feed_nesting_at_limit_is_accepted() {
        let mut input = Vec::new();
        input.extend(std::iter::repeat_n(b'[', 1024));
        input.extend(std::iter::repeat_n(b']', 1024));
        let out = feed_all(&input);
        assert_eq!(out.len(), 1);
        assert!(out[0].is_ok());
    }

    #[test]
    fn feed_oversized_string_gives_one_error_and_bounded_memory() {
        let limits = Limits {
            max_bytes: 1000,
            ..Limits::default()
        };
        let mut s = JsonStream::new(limits);
        let mut out = Vec::new();
        s.feed(b"{\"execute\": \"x\", \"id\": \"", &mut out);
        let chunk = vec![b'a'; 4096];
        for _ in 0..100 {
            s.feed(&chunk, &mut out);
            assert!(s.text.capacity() <= 1000);
        }
        s.feed(b"\\\"{[\"}{\"execute\": \"next\"}", &mut out);
        let got: Vec<_> = out
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                Err("JSON token size limit exceeded".to_string()),
                Ok(json!({"execute": "next"}))
            ]
        );
    }

    #[test]
    fn feed_too_many_tokens_gives_one_error() {
        let limits = Limits {
            max_tokens: 10,
            ..Limits::default()
        };
        let mut s = JsonStream::new(limits);
        let mut out = Vec::new();
        s.feed(b"[1,2,3,4,5,6,7,8,9,10] {}", &mut out);
        let got: Vec<_> = out
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                Err("JSON token count limit exceeded".to_string()),
                Ok(json!({}))
            ]
        );
    }

    #[test]
    fn finish_reports_a_partial_message() {
        let mut s = JsonStream::default();
        let mut out = Vec::new();
        s.feed(b"{\"a\": 1", &mut out);
        s.finish(&mut out);
        assert_eq!(
            out,
            vec![Err(JsonError::Syntax("premature EOI".to_string()))]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn feed_arbitrary_bytes_never_panics() {
        // A cheap deterministic fuzz: every byte value in every lexer state.
        let prefixes: &[&[u8]] = &[
            b"", b"\"", b"'", b"0", b"-", b"1.", b"1e", b"1e+", b"t", b"{",
        ];
        for p in prefixes {
            for b in 0..=255u8 {
                let mut s = JsonStream::default();
                let mut out = Vec::new();
                s.feed(p, &mut out);
                s.feed(&[b, b'}', b'"', b']'], &mut out);
                s.finish(&mut out);
                assert!(s.is_idle());
            }
        }
    }
}
