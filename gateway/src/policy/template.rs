//! `{name}` placeholders in configured text (header values, redirect targets), split once when
//! the configuration is compiled into literal pieces and resolved placeholders. `{{` and `}}`
//! are literal braces.

/// The pieces of `text`: literal runs through `literal`, each placeholder's name through
/// `placeholder` (whose error says what is wrong with it). Empty text has no pieces.
pub fn parse<T>(
    text: &str,
    literal: impl Fn(String) -> T,
    mut placeholder: impl FnMut(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let mut parts = Vec::new();
    let mut run = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(['{', '}']) {
        run.push_str(&rest[..i]);
        if rest[i..].starts_with("{{") || rest[i..].starts_with("}}") {
            run.push(rest.as_bytes()[i] as char);
            rest = &rest[i + 2..];
            continue;
        }
        if rest.as_bytes()[i] == b'}' {
            return Err("a `}` without its `{` (write `}}` for a brace)".into());
        }
        let after = &rest[i + 1..];
        let end = after.find('}').ok_or("a `{` without its `}`")?;
        let part = placeholder(&after[..end])?;
        if !run.is_empty() {
            parts.push(literal(std::mem::take(&mut run)));
        }
        parts.push(part);
        rest = &after[end + 1..];
    }
    run.push_str(rest);
    if !run.is_empty() {
        parts.push(literal(run));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_and_braces() {
        let lit = |s: String| format!("<{s}>");
        let ph = |n: &str| Ok(format!("[{n}]"));
        assert_eq!(
            parse("a{x}b{{c}}", lit, ph).unwrap(),
            ["<a>", "[x]", "<b{c}>"]
        );
        assert!(parse("", lit, ph).unwrap().is_empty());
        assert!(parse("a{b", lit, ph).is_err());
        assert!(parse("a}b", lit, ph).is_err());
    }
}
