//! The harness's prompt templates: Jinja (through minijinja) with the harness's
//! environment and its rules for `doc_to_text`, `doc_to_target` and `doc_to_choice`
//! (`lm_eval/api/task.py`, `utils.apply_template`).
//!
//! The environment is the harness's: an undefined name is an error (`StrictUndefined`),
//! a trailing newline is kept, and the filter `regex_replace` exists. Python methods
//! that task templates call on values (`"a".upper()`, `d.items()`, `xs.index(x)`) work
//! as in Jinja on Python (minijinja-contrib's `pycompat`, plus `list.index`).
//!
//! A field spec (the YAML value of `doc_to_text` and the like) is read as the harness
//! reads it:
//! - an integer (or, for targets and choices, a list) is itself;
//! - a string that is a column of the data is that column's value;
//! - any other string is a template, rendered to a string. Then a target that is all
//!   digits, in a task with choices, is an index; a target or a choice list that reads
//!   as a list literal (`['a', 'b']`) is that list. A template that is a single
//!   expression (`{{choices.text}}`) is evaluated to its value directly, which is what
//!   rendering and `ast.literal_eval` give in Python.

use std::collections::BTreeSet;

use minijinja::value::{Serde, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde_json::{Map, Value};

/// A document: the data row as JSON.
pub type Row = Map<String, Value>;

/// The harness's Jinja environment.
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

impl Templates {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        env.add_filter("regex_replace", regex_replace);
        env.set_unknown_method_callback(|state, value, method, args| {
            if value.kind() == ValueKind::Seq && method == "index" && args.len() == 1 {
                for (i, item) in value.try_iter()?.enumerate() {
                    if item == args[0] {
                        return Ok(JValue::from(i));
                    }
                }
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{} is not in list", args[0]),
                ));
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        Templates { env }
    }

    /// Render `template` with the fields of `row`.
    pub fn render(&self, template: &str, row: &Row) -> Result<String, String> {
        self.env
            .render_str(template, JValue::from(Serde(row)))
            .map_err(|e| self.explain(e, template, row))
    }

    /// The value of a template: evaluated when it is one `{{ expression }}`, else
    /// rendered and read as a Python literal list where it looks like one.
    pub fn value(&self, template: &str, row: &Row) -> Result<Value, String> {
        if let Some(expr) = single_expression(template) {
            let compiled = self
                .env
                .compile_expression(expr)
                .map_err(|e| format!("template {template:?}: {e}"))?;
            let v = compiled
                .eval(JValue::from(Serde(row)))
                .map_err(|e| self.explain(e, template, row))?;
            return serde_json::to_value(&v).map_err(|e| format!("template {template:?}: {e}"));
        }
        let s = self.render(template, row)?;
        Ok(parse_list_literal(&s).unwrap_or(Value::String(s)))
    }

    /// An error message that names the missing field, if that is the problem.
    fn explain(&self, e: minijinja::Error, template: &str, row: &Row) -> String {
        if e.kind() == ErrorKind::UndefinedError {
            let names: BTreeSet<String> = match single_expression(template) {
                Some(expr) => self
                    .env
                    .compile_expression(expr)
                    .map(|c| c.undeclared_variables(false).into_iter().collect())
                    .unwrap_or_default(),
                None => self
                    .env
                    .template_from_str(template)
                    .map(|t| t.undeclared_variables(false).into_iter().collect())
                    .unwrap_or_default(),
            };
            let missing: Vec<&String> = names.iter().filter(|n| !row.contains_key(*n)).collect();
            let fields: Vec<&String> = row.keys().collect();
            if let Some(m) = missing.first() {
                return format!(
                    "the template {template:?} names the field {m:?}, which the data lack (fields: {})",
                    fields
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            return format!("the template {template:?} reads an undefined value: {e}");
        }
        format!("the template {template:?} failed: {e}")
    }
}

/// The inner expression of a template that is exactly one `{{ … }}`.
fn single_expression(template: &str) -> Option<&str> {
    let t = template.trim();
    let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%"))
        .then_some(inner.trim())
}

/// The harness's `regex_replace(string, pattern, repl, count=0)` (`re.sub`).
fn regex_replace(
    s: String,
    pattern: String,
    repl: String,
    count: Option<usize>,
) -> Result<String, minijinja::Error> {
    let re = regex::Regex::new(&pattern).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("regex {pattern:?}: {e}"),
        )
    })?;
    // Python's group references \1 and \g<1> are $1 in Rust's syntax.
    let py_group = regex::Regex::new(r"\\g<(\w+)>|\\(\d+)").expect("valid");
    let repl = repl.replace('$', "$$");
    let repl = py_group.replace_all(&repl, |c: &regex::Captures| {
        format!("${{{}}}", c.get(1).or(c.get(2)).map_or("", |m| m.as_str()))
    });
    Ok(re
        .replacen(&s, count.unwrap_or(0), repl.as_ref())
        .into_owned())
}

/// A Python (or minijinja) list literal of strings and numbers, as `ast.literal_eval`
/// reads it; None if `s` is not one.
pub fn parse_list_literal(s: &str) -> Option<Value> {
    let t = s.trim();
    if !(t.starts_with('[') && t.ends_with(']')) {
        return None;
    }
    let mut out = Vec::new();
    let chars: Vec<char> = t[1..t.len() - 1].chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            break;
        }
        let c = chars[i];
        if c == '\'' || c == '"' {
            let q = c;
            i += 1;
            let mut s = String::new();
            while i < chars.len() && chars[i] != q {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                    s.push(match chars[i] {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        other => other,
                    });
                } else {
                    s.push(chars[i]);
                }
                i += 1;
            }
            if i >= chars.len() {
                return None;
            }
            i += 1;
            out.push(Value::String(s));
        } else {
            let start = i;
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            let tok: String = chars[start..i].iter().collect();
            let tok = tok.trim();
            if let Ok(n) = tok.parse::<i64>() {
                out.push(Value::from(n));
            } else if let Ok(x) = tok.parse::<f64>() {
                out.push(Value::from(x));
            } else {
                return None;
            }
        }
        skip_ws(&mut i);
        if i < chars.len() {
            if chars[i] != ',' {
                return None;
            }
            i += 1;
        }
    }
    Some(Value::Array(out))
}

/// Whether the harness's `str.isdigit()` holds (ASCII digits, at least one).
pub fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// What a text field of a row renders as where the harness calls `str()` on it.
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_as_the_harness_does() {
        let t = Templates::new();
        let r = row(
            serde_json::json!({"question": "Onde?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}),
        );
        assert_eq!(
            t.render("Question: {{question}}\nAnswer:", &r).unwrap(),
            "Question: Onde?\nAnswer:"
        );
        assert_eq!(t.render("{{question}}\n", &r).unwrap(), "Onde?\n");
        assert_eq!(
            t.render("{{choices.label.index(answerKey)}}", &r).unwrap(),
            "1"
        );
        assert_eq!(
            t.value("{{choices.text}}", &r).unwrap(),
            serde_json::json!(["a", "b"])
        );
        assert_eq!(t.render("{{question.upper()}}", &r).unwrap(), "ONDE?");
        assert_eq!(
            t.render("{{question | regex_replace('(O)nde', 'L\\\\1')}}", &r)
                .unwrap(),
            "LO?"
        );
        let e = t.render("{{pergunta}}", &r).unwrap_err();
        assert!(e.contains("\"pergunta\""), "{e}");
    }

    #[test]
    fn list_literals() {
        assert_eq!(
            parse_list_literal("['a', \"b's\", 3]"),
            Some(serde_json::json!(["a", "b's", 3]))
        );
        assert_eq!(parse_list_literal("[a]"), None);
        assert_eq!(parse_list_literal("abc"), None);
    }
}
