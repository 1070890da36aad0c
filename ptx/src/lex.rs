//! The PTX lexer: words, punctuation and strings, each carrying the whitespace and comments before it,
//! so that printing the tokens in order gives the text back exactly.

/// What a token is; PTX needs no finer split (opcodes, directives, registers and numbers are all words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `ld.global.u32`, `.entry`, `%ctaid.x`, `$L__BB0_2`, `0f3F800000`, `ld.shared::cta.u32`.
    Word,
    /// One character of punctuation: `; , { } ( ) [ ] : + - < > = @ ! |` and anything else.
    Punct,
    /// A double-quoted string with its quotes.
    Str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    /// Whitespace and comments before the token.
    pub trivia: String,
    pub text: String,
}

impl Token {
    pub fn is(&self, text: &str) -> bool {
        self.text == text
    }

    /// Whether a line break separates this token from the one before it.
    pub fn starts_line(&self) -> bool {
        self.trivia.contains('\n')
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LexError {
    #[error("unterminated block comment starting at byte {0}")]
    Comment(usize),
    #[error("unterminated string starting at byte {0}")]
    String(usize),
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '%' | '.')
}

/// Splits `text` into tokens; the trivia after the last token is returned separately.
pub fn lex(text: &str) -> Result<(Vec<Token>, String), LexError> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let mut trivia_start = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if text[i..].starts_with("//") {
            i = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
            continue;
        }
        if text[i..].starts_with("/*") {
            let end = text[i + 2..].find("*/").ok_or(LexError::Comment(i))?;
            i += 2 + end + 2;
            continue;
        }
        let start = i;
        let kind = if c == '"' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(LexError::String(start)),
                    Some(b'\\') => i += 2,
                    Some(b'"') => break,
                    Some(_) => i += 1,
                }
            }
            i += 1;
            Kind::Str
        } else if is_word_char(c) {
            while i < bytes.len() {
                let d = bytes[i] as char;
                if is_word_char(d) {
                    i += 1;
                } else if text[i..].starts_with("::") && bytes.get(i + 2).is_some_and(|&b| is_word_char(b as char)) {
                    // State-space qualifiers such as `.shared::cta` belong to the word.
                    i += 2;
                } else {
                    break;
                }
            }
            Kind::Word
        } else {
            // One character, whatever its UTF-8 length (`c` above is only its first byte).
            i += text[i..].chars().next().map_or(1, char::len_utf8);
            Kind::Punct
        };
        tokens.push(Token { kind, trivia: text[trivia_start..start].to_string(), text: text[start..i].to_string() });
        trivia_start = i;
    }
    Ok((tokens, text[trivia_start..].to_string()))
}

/// The tokens of a snippet this crate generates (which always lexes; empty if it did not), the
/// trailing trivia dropped: the rewrite splices them into a parsed module.
pub fn tokens(text: &str) -> Vec<Token> {
    lex(text).map(|(t, _)| t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_dots_and_state_space_qualifiers() {
        let (toks, rest) = lex("\t@!%p1 ld.shared::cta.u32 %r1, [%rd2+4]; // x\n").unwrap();
        let texts: Vec<&str> = toks.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["@", "!", "%p1", "ld.shared::cta.u32", "%r1", ",", "[", "%rd2", "+", "4", "]", ";"]);
        assert_eq!(rest, " // x\n");
    }

    #[test]
    fn labels_split_at_a_single_colon_and_strings_keep_escapes() {
        let (toks, _) = lex("$L__BB0_2:\n.file 1 \"a \\\"b\\\".cu\"").unwrap();
        let texts: Vec<&str> = toks.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["$L__BB0_2", ":", ".file", "1", "\"a \\\"b\\\".cu\""]);
    }

    #[test]
    fn non_ascii_text_is_punctuation_not_a_panic() {
        let (toks, _) = lex("mov.u32 %r1, é€😀;").unwrap();
        let texts: Vec<&str> = toks.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["mov.u32", "%r1", ",", "é", "€", "😀", ";"]);
    }

    #[test]
    fn unterminated_comment_and_string_are_errors() {
        assert_eq!(lex("a /* b").unwrap_err(), LexError::Comment(2));
        assert_eq!(lex("a \"b").unwrap_err(), LexError::String(2));
    }
}
