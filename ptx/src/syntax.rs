//! The statement tree of a PTX module: statements, labels, `{ }` scopes and functions with their
//! headers. It keeps every token, so [`Module::print`] gives back exactly the text it was parsed from.

use crate::lex::{lex, Kind, LexError, Token};

/// Deepest nesting of `{ }` scopes accepted: every walk of the tree recurses once per level, and a
/// stack overflow cannot be caught (nvcc's output nests three or four deep).
pub const MAX_DEPTH: usize = 64;

/// Directives that end at the end of their line rather than at a `;`.
const LINE_DIRECTIVES: [&str; 5] = [".version", ".target", ".address_size", ".file", ".loc"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// An instruction or a directive, with its `;` when it has one.
    Stmt(Vec<Token>),
    /// `name:` (the two tokens).
    Label(Token, Token),
    /// A header (a function's signature and performance directives, `.section` name; empty for a
    /// nested block) and the scope that follows it.
    Scope(Scope),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub header: Vec<Token>,
    pub open: Token,
    pub items: Vec<Item>,
    pub close: Token,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub items: Vec<Item>,
    /// Whitespace and comments after the last token.
    pub trailer: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error(transparent)]
    Lex(#[from] LexError),
    #[error("unbalanced `{0}` near token {1} (`{2}`)")]
    Unbalanced(char, usize, String),
    #[error("text ends inside a statement that starts with `{0}`")]
    Unterminated(String),
    #[error("scopes nested deeper than {MAX_DEPTH} near token {0}")]
    TooDeep(usize),
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// Inside a `.section` (debug information: `.b8 95,90,...` data lines with no `;`), every
    /// statement ends at the end of its line.
    in_section: bool,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Token {
        let t = self.tokens[self.pos].clone();
        self.pos += 1;
        t
    }

    /// Items until a `}` (left for the caller) or the end.
    fn items(&mut self, top_level: bool) -> Result<Vec<Item>, ParseError> {
        let mut items = Vec::new();
        while let Some(t) = self.peek() {
            if t.is("}") {
                if top_level {
                    return Err(ParseError::Unbalanced('}', self.pos, t.text.clone()));
                }
                break;
            }
            if t.is("{") {
                let open = self.next();
                items.push(Item::Scope(self.scope_rest(Vec::new(), open)?));
                continue;
            }
            let is_label = t.kind == Kind::Word && self.tokens.get(self.pos + 1).is_some_and(|n| n.is(":"));
            if is_label {
                let name = self.next();
                items.push(Item::Label(name, self.next()));
                continue;
            }
            items.push(self.statement(top_level)?);
        }
        Ok(items)
    }

    /// The rest of a scope after its `{`.
    fn scope_rest(&mut self, header: Vec<Token>, open: Token) -> Result<Scope, ParseError> {
        let at = self.pos;
        if self.depth >= MAX_DEPTH {
            return Err(ParseError::TooDeep(at));
        }
        self.depth += 1;
        let outer = self.in_section;
        self.in_section |= header.first().is_some_and(|t| t.is(".section"));
        let items = self.items(false);
        self.in_section = outer;
        self.depth -= 1;
        let items = items?;
        match self.peek() {
            Some(t) if t.is("}") => Ok(Scope { header, open, items, close: self.next() }),
            _ => Err(ParseError::Unbalanced('{', at, open.text)),
        }
    }

    /// One statement; at top level a `{` that does not follow `=` opens the statement's scope (a
    /// function body, a `.section`). Elsewhere braces inside a statement are vector operands or
    /// initializers and belong to it.
    fn statement(&mut self, top_level: bool) -> Result<Item, ParseError> {
        let first = self.next();
        let line_directive = self.in_section || LINE_DIRECTIVES.contains(&first.text.as_str());
        let mut toks = vec![first];
        let mut depth = 0usize;
        loop {
            let Some(t) = self.peek() else {
                if line_directive && depth == 0 {
                    return Ok(Item::Stmt(toks));
                }
                return Err(ParseError::Unterminated(toks[0].text.clone()));
            };
            if line_directive && depth == 0 && (t.starts_line() || t.is("}")) {
                return Ok(Item::Stmt(toks));
            }
            if t.is("{") && depth == 0 && top_level && !toks.iter().any(|t| t.is("=")) {
                let open = self.next();
                return Ok(Item::Scope(self.scope_rest(toks, open)?));
            }
            let t = self.next();
            if t.is("{") {
                depth += 1;
            } else if t.is("}") {
                if depth == 0 {
                    return Err(ParseError::Unbalanced('}', self.pos - 1, toks[0].text.clone()));
                }
                depth -= 1;
            }
            let end = t.is(";") && depth == 0;
            toks.push(t);
            if end {
                return Ok(Item::Stmt(toks));
            }
        }
    }
}

impl Module {
    pub fn parse(text: &str) -> Result<Module, ParseError> {
        let (tokens, trailer) = lex(text)?;
        let mut parser = Parser { tokens, pos: 0, in_section: false, depth: 0 };
        let items = parser.items(true)?;
        Ok(Module { items, trailer })
    }

    pub fn print(&self) -> String {
        let mut out = String::new();
        print_items(&self.items, &mut out);
        out.push_str(&self.trailer);
        out
    }
}

fn print_tokens(tokens: &[Token], out: &mut String) {
    for t in tokens {
        out.push_str(&t.trivia);
        out.push_str(&t.text);
    }
}

pub fn print_items(items: &[Item], out: &mut String) {
    for item in items {
        match item {
            Item::Stmt(toks) => print_tokens(toks, out),
            Item::Label(name, colon) => print_tokens(&[name.clone(), colon.clone()], out),
            Item::Scope(s) => {
                print_tokens(&s.header, out);
                print_tokens(std::slice::from_ref(&s.open), out);
                print_items(&s.items, out);
                print_tokens(std::slice::from_ref(&s.close), out);
            }
        }
    }
}

/// Every statement in `items`, nested scopes included, in text order.
pub fn statements(items: &[Item]) -> Vec<&[Token]> {
    let mut out = Vec::new();
    collect_statements(items, &mut out);
    out
}

fn collect_statements<'a>(items: &'a [Item], out: &mut Vec<&'a [Token]>) {
    for item in items {
        match item {
            Item::Stmt(toks) => out.push(toks),
            Item::Label(..) => {}
            Item::Scope(s) => collect_statements(&s.items, out),
        }
    }
}

/// The same walk, for rewriting in place.
pub fn statements_mut(items: &mut [Item], visit: &mut dyn FnMut(&mut Vec<Token>)) {
    for item in items {
        match item {
            Item::Stmt(toks) => visit(toks),
            Item::Label(..) => {}
            Item::Scope(s) => statements_mut(&mut s.items, visit),
        }
    }
}

/// The kind of function a top-level scope defines, from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuncKind {
    Entry,
    Func,
}

/// A function definition's name, kind and the index range of its parameter list in the header
/// (the tokens strictly between its parentheses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub kind: FuncKind,
    pub name: String,
    /// Index of the `(` that opens the parameter list, and of its `)`.
    pub params_open: usize,
    pub params_close: usize,
}

fn matching_paren(header: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, t) in header.iter().enumerate().skip(open) {
        if t.is("(") {
            depth += 1;
        } else if t.is(")") {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// Reads a function header: `[.visible|.weak|.extern] .entry NAME ( params ) [perf directives]` or
/// `.func [(return params)] NAME ( params ) [.noreturn]`. `None` for any other header.
pub fn signature(header: &[Token]) -> Option<Signature> {
    let at = header.iter().position(|t| t.is(".entry") || t.is(".func"))?;
    let kind = if header[at].is(".entry") { FuncKind::Entry } else { FuncKind::Func };
    let mut i = at + 1;
    if kind == FuncKind::Func && header.get(i)?.is("(") {
        i = matching_paren(header, i)? + 1;
    }
    let name = header.get(i).filter(|t| t.kind == Kind::Word)?.text.clone();
    let params_open = i + 1;
    if !header.get(params_open)?.is("(") {
        // `.func name` with no parameter list at all: an empty list with nowhere to add to.
        return Some(Signature { kind, name, params_open: i, params_close: i });
    }
    let params_close = matching_paren(header, params_open)?;
    Some(Signature { kind, name, params_open, params_close })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "//\n// Generated\n.version 8.5\n.target sm_90\n.address_size 64\n\n\t// .globl\tk\n\
        .global .align 4 .b32 tab[2] = {1, 2};\n.visible .entry k(\n\t.param .u64 k_param_0\n)\n.maxntid 128, 1, 1\n{\n\
        \t.reg .b32 \t%r<3>;\n\tmov.u32 \t%r1, %ctaid.x;\n\t{\n\t.reg .pred %p;\n\t}\n$L__BB0_1:\n\
        \tld.global.v2.u32 \t{%r1, %r2}, [tab];\n\tret;\n\n}\n";

    #[test]
    fn print_gives_back_the_input() {
        let m = Module::parse(SAMPLE).unwrap();
        assert_eq!(m.print(), SAMPLE);
    }

    #[test]
    fn structure_of_a_kernel() {
        let m = Module::parse(SAMPLE).unwrap();
        // .version, .target, .address_size, the initialized global, the kernel.
        assert_eq!(m.items.len(), 5);
        let Item::Scope(k) = &m.items[4] else { panic!("kernel is not a scope: {:?}", m.items[4]) };
        let sig = signature(&k.header).unwrap();
        assert_eq!((sig.kind, sig.name.as_str()), (FuncKind::Entry, "k"));
        assert_eq!(k.header[sig.params_open + 1].text, ".param");
        assert!(k.header[sig.params_close].is(")"));
        assert!(matches!(&k.items[2], Item::Scope(s) if s.header.is_empty()));
        assert!(matches!(&k.items[3], Item::Label(l, _) if l.text == "$L__BB0_1"));
        let vector_load = statements(&k.items).into_iter().find(|s| s[0].text.starts_with("ld.global")).unwrap();
        assert_eq!(vector_load.last().unwrap().text, ";");
    }

    #[test]
    fn debug_sections_have_line_statements() {
        // What `nvcc -lineinfo` appends: data lines without `;`, labels, a closing brace on its own.
        let text = ".version 8.7\n.file\t1 \"/src/a.cu\", 1733300000, 2048\n.entry k()\n{\n\t.loc\t1 5 1, function_name $L__info_string0, inlined_at 1 9 3\n\
            \tret;\n}\n\t.section\t.debug_str\n\t{\n$L__info_string0:\n.b8 95,90,49,0\n.b64 $L__info_string0\n\t}\n";
        let m = Module::parse(text).unwrap();
        assert_eq!(m.print(), text);
        let Item::Scope(section) = m.items.last().unwrap() else { panic!("no section scope") };
        assert_eq!(section.items.len(), 3);
        assert_eq!(statements(&section.items).len(), 2);
    }

    #[test]
    fn func_with_return_value_and_unbalanced_input() {
        let m = Module::parse(".func (.param .b32 func_retval0) _Z1fv()\n{\n\tret;\n}\n").unwrap();
        let Item::Scope(f) = &m.items[0] else { panic!() };
        let sig = signature(&f.header).unwrap();
        assert_eq!((sig.kind, sig.name.as_str(), sig.params_close - sig.params_open), (FuncKind::Func, "_Z1fv", 1));
        assert!(matches!(Module::parse(".entry k()\n{\n\tret;\n"), Err(ParseError::Unbalanced('{', ..))));
        assert!(matches!(Module::parse("}"), Err(ParseError::Unbalanced('}', ..))));
        assert!(matches!(Module::parse("\tret"), Err(ParseError::Unterminated(_))));
        let deep = format!(".entry k()\n{}ret;{}", "{".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(Module::parse(&deep).is_ok());
        let deeper = format!(".entry k()\n{}ret;{}", "{".repeat(100_000), "}".repeat(100_000));
        assert!(matches!(Module::parse(&deeper), Err(ParseError::TooDeep(_))));
    }
}
