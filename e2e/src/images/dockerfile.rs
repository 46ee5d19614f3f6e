//! The subset of the Dockerfile language that the cloudpass Dockerfile uses: stages,
//! line continuations, comments, `ARG`/`ENV` variables and the word splitting of
//! `LABEL`, `ENV`, `ARG` and `COPY`. The image assembler interprets the final stages
//! with it, and the tests read the Dockerfile through it; nothing else parses the file.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

/// One instruction: its keyword in upper case, the rest of its (joined) line, and the
/// number of the line it starts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// `COPY`, `LABEL`, ...
    pub keyword: String,
    /// Everything after the keyword, continuations joined with a space.
    pub args: String,
    /// 1-based line number of the instruction's first line.
    pub line: usize,
}

/// One `FROM <base> AS <name>` stage and its instructions.
#[derive(Clone, Debug)]
pub struct Stage {
    /// The stage's name (`AS <name>`); every stage of the cloudpass Dockerfile has one.
    pub name: String,
    /// The base: an image reference, `scratch`, or the name of an earlier stage.
    pub from: String,
    /// The instructions after `FROM`, in order.
    pub instructions: Vec<Instruction>,
}

impl Stage {
    /// The arguments of every instruction with this keyword, in order.
    pub fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions.iter().filter(|i| i.keyword == keyword).map(|i| i.args.as_str()).collect()
    }
}

/// A parsed Dockerfile: the `ARG`s before the first `FROM`, and the stages in order.
#[derive(Clone, Debug)]
pub struct Dockerfile {
    /// `ARG` instructions before the first `FROM` (usable in `FROM`, and in a stage that
    /// declares them again without a value).
    pub global_args: Vec<Instruction>,
    /// The stages, in file order.
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    /// Parses `text`: joins `\` continuations, drops comment lines (parser directives
    /// such as `# syntax=` included) and splits the file into named stages.
    pub fn parse(text: &str) -> Result<Self> {
        let mut logical = Vec::new();
        let mut current = String::new();
        let mut start = 0;
        for (index, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            if current.is_empty() {
                start = index + 1;
            }
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    current.push_str(part.trim());
                    current.push(' ');
                }
                None => {
                    current.push_str(trimmed);
                    logical.push((start, std::mem::take(&mut current)));
                }
            }
        }
        if !current.trim().is_empty() {
            bail!("line {start}: the file ends inside a continued instruction");
        }
        let mut dockerfile = Self { global_args: Vec::new(), stages: Vec::new() };
        for (line, text) in logical.into_iter().filter(|(_, l)| !l.trim().is_empty()) {
            let (keyword, rest) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
            let instruction = Instruction { keyword: keyword.to_uppercase(), args: rest.trim().to_owned(), line };
            if instruction.keyword == "FROM" {
                let words: Vec<&str> = instruction.args.split_whitespace().collect();
                let (from, name) = match words.as_slice() {
                    [from, as_, name] if as_.eq_ignore_ascii_case("as") => (*from, *name),
                    _ => {
                        bail!("line {line}: every stage is named (`FROM <base> AS <name>`): FROM {}", instruction.args)
                    }
                };
                if dockerfile.stage(name).is_some() {
                    bail!("line {line}: a second stage named {name}");
                }
                dockerfile.stages.push(Stage {
                    name: name.to_owned(),
                    from: from.to_owned(),
                    instructions: Vec::new(),
                });
            } else if let Some(stage) = dockerfile.stages.last_mut() {
                stage.instructions.push(instruction);
            } else if instruction.keyword == "ARG" {
                dockerfile.global_args.push(instruction);
            } else {
                bail!("line {line}: {} before the first FROM", instruction.keyword);
            }
        }
        Ok(dockerfile)
    }

    /// The stage named `name`.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stages built `FROM scratch`: the images this Dockerfile makes.
    pub fn scratch_stages(&self) -> impl Iterator<Item = &Stage> {
        self.stages.iter().filter(|s| s.from == "scratch")
    }

    /// The values of the global `ARG`s: their defaults, overridden by `build_args`.
    pub fn global_values(&self, build_args: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
        let mut values = BTreeMap::new();
        for instruction in &self.global_args {
            declare_args(&instruction.args, build_args, &BTreeMap::new(), &mut values)
                .with_context(|| format!("line {}", instruction.line))?;
        }
        Ok(values)
    }
}

/// Applies one `ARG` instruction to `vars`: each declared name takes the build argument
/// if one is given, else its default (expanded with `vars`), else the global value.
pub fn declare_args(
    args: &str,
    build_args: &BTreeMap<String, String>,
    globals: &BTreeMap<String, String>,
    vars: &mut BTreeMap<String, String>,
) -> Result<()> {
    for word in words(args, vars)? {
        let (name, default) = match word.split_once('=') {
            Some((name, default)) => (name.to_owned(), Some(default.to_owned())),
            None => (word, None),
        };
        let value = build_args.get(&name).cloned().or(default).or_else(|| globals.get(&name).cloned());
        // An ARG without any value is declared but unset, as in Docker.
        if let Some(value) = value {
            vars.insert(name, value);
        }
    }
    Ok(())
}

/// `key=value` pairs of a `LABEL` or `ENV` instruction (also the legacy `ENV key value`),
/// variables expanded.
pub fn key_values(keyword: &str, args: &str, vars: &BTreeMap<String, String>) -> Result<Vec<(String, String)>> {
    let words = words(args, vars)?;
    if keyword == "ENV" && words.first().is_some_and(|w| !w.contains('=')) {
        // `ENV NAME value with spaces`: everything after the name is the value.
        let name = words[0].clone();
        let value = args.trim_start()[name.len()..].trim();
        return Ok(vec![(name, expand_only(value, vars)?)]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("{keyword}: `{w}` is not key=value"),
        })
        .collect()
}

/// A `COPY` instruction: its flags, sources and destination, variables expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy {
    /// `--from=<stage>`: the stage (or image) to copy from; `None` copies from the context.
    pub from: Option<String>,
    /// `--chmod=<octal>`.
    pub chmod: Option<u32>,
    /// `--chown=<uid>[:<gid>]`, numeric only.
    pub chown: Option<(u64, u64)>,
    /// The sources, as written.
    pub sources: Vec<String>,
    /// The destination; a trailing `/` makes it a directory.
    pub dest: String,
}

impl Copy {
    /// Parses the arguments of `COPY` (shell or JSON form).
    pub fn parse(args: &str, vars: &BTreeMap<String, String>) -> Result<Self> {
        let mut words = words(args, vars)?;
        let mut copy = Self { from: None, chmod: None, chown: None, sources: Vec::new(), dest: String::new() };
        while words.first().is_some_and(|w| w.starts_with("--")) {
            let flag = words.remove(0);
            let (name, value) = flag.split_once('=').unwrap_or((&flag, ""));
            match name {
                "--from" => copy.from = Some(value.to_owned()),
                "--chmod" => {
                    copy.chmod = Some(u32::from_str_radix(value, 8).with_context(|| format!("COPY {flag}: octal"))?)
                }
                "--chown" => {
                    let (user, group) = value.split_once(':').unwrap_or((value, value));
                    let parse = |id: &str| id.parse::<u64>().with_context(|| format!("COPY {flag}: numeric ids only"));
                    copy.chown = Some((parse(user)?, parse(group)?));
                }
                // Only changes how BuildKit caches the layer, not its content.
                "--link" => {}
                _ => bail!("COPY: the flag {flag} is not supported"),
            }
        }
        if let [first, ..] = words.as_slice()
            && first.starts_with('[')
        {
            let rest = args[args.find('[').expect("a [")..].to_owned();
            words = serde_json::from_str::<Vec<String>>(&rest)
                .context("COPY in JSON form")?
                .iter()
                .map(|w| expand_only(w, vars))
                .collect::<Result<_>>()?;
        }
        match words.split_last() {
            Some((dest, sources)) if !sources.is_empty() => {
                copy.dest = dest.clone();
                copy.sources = sources.to_vec();
            }
            _ => bail!("COPY needs at least one source and a destination: COPY {args}"),
        }
        if copy.sources.len() > 1 && !copy.dest.ends_with('/') {
            bail!("COPY with several sources needs a directory destination ending in /: COPY {args}");
        }
        Ok(copy)
    }
}

/// An `ENTRYPOINT` or `CMD` in exec (JSON) form; the shell form would need a shell.
pub fn exec_form(keyword: &str, args: &str) -> Result<Vec<String>> {
    serde_json::from_str(args)
        .with_context(|| format!("{keyword} {args}: only the exec form [\"...\"] runs without a shell"))
}

/// Expands variables without splitting words (for values taken whole).
pub fn expand_only(text: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => out.push(chars.next().expect("peeked")),
            '$' => out.push_str(&variable(&mut chars, vars)?),
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// Splits `text` into words the way Docker does for `LABEL`, `ENV`, `ARG` and `COPY`:
/// whitespace separates words, double quotes group (expanding variables, `\` escapes the
/// next character), single quotes group literally, and `$NAME`, `${NAME}`,
/// `${NAME:-default}` and `${NAME:+alternative}` expand from `vars`.
pub fn words(text: &str, vars: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(next @ ('"' | '\\' | '$')) => word.push(next),
                            Some(next) => {
                                word.push('\\');
                                word.push(next);
                            }
                            None => bail!("unterminated \" in: {text}"),
                        },
                        Some('$') => word.push_str(&variable(&mut chars, vars)?),
                        Some(other) => word.push(other),
                        None => bail!("unterminated \" in: {text}"),
                    }
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(other) => word.push(other),
                        None => bail!("unterminated ' in: {text}"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(next) => word.push(next),
                    None => word.push('\\'),
                }
            }
            '$' => {
                in_word = true;
                word.push_str(&variable(&mut chars, vars)?);
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The value of the variable whose reference starts after a `$`.
fn variable(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, vars: &BTreeMap<String, String>) -> Result<String> {
    let is_name = |c: &char| c.is_ascii_alphanumeric() || *c == '_';
    if chars.peek() == Some(&'{') {
        chars.next();
        let mut inner = String::new();
        loop {
            match chars.next() {
                Some('}') => break,
                Some(c) => inner.push(c),
                None => bail!("unterminated ${{{inner}"),
            }
        }
        let (name, modifier) = match inner.find(":-").or_else(|| inner.find(":+")) {
            Some(at) => (&inner[..at], Some((&inner[at..at + 2], &inner[at + 2..]))),
            None => (inner.as_str(), None),
        };
        if name.is_empty() || !name.chars().all(|c| is_name(&c)) {
            bail!("${{{inner}}}: unsupported variable reference");
        }
        let value = vars.get(name).filter(|v| !v.is_empty());
        return Ok(match (modifier, value) {
            (None, value) => value.cloned().unwrap_or_default(),
            (Some((":-", default)), None) => expand_only(default, vars)?,
            (Some((":-", _)), Some(value)) => value.clone(),
            (Some((_, alternative)), Some(_)) => expand_only(alternative, vars)?,
            (Some(_), None) => String::new(),
        });
    }
    let mut name = String::new();
    while let Some(c) = chars.peek().filter(|c| is_name(c)) {
        name.push(*c);
        chars.next();
    }
    if name.is_empty() {
        return Ok("$".to_owned());
    }
    Ok(vars.get(&name).cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn stages_continuations_and_comments() {
        let text = "# syntax=docker/dockerfile:1\nARG BASE=x\nFROM rust:1 AS build\nRUN a \\\n    # inside\n    b\n\nFROM scratch as app\nCOPY --from=build /out/x /x\n";
        let file = Dockerfile::parse(text).unwrap();
        assert_eq!(file.global_args.len(), 1);
        assert_eq!(file.stages.len(), 2);
        let build = file.stage("build").unwrap();
        assert_eq!(build.all("RUN"), ["a b"]);
        assert_eq!(build.instructions[0].line, 4);
        let app = file.stage("app").unwrap();
        assert_eq!(app.from, "scratch");
        assert_eq!(file.scratch_stages().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["app"]);
        assert!(Dockerfile::parse("FROM scratch\n").is_err(), "unnamed stage");
        assert!(Dockerfile::parse("COPY a b\n").is_err(), "instruction before FROM");
    }

    #[test]
    fn quotes_escapes_and_variables() {
        let v = vars(&[("VERSION", "0.1.0"), ("EMPTY", "")]);
        assert_eq!(
            words(r#"a="b c" d='$VERSION' e=${VERSION} f=$VERSION-x g=\"h\" i="j\"k""#, &v).unwrap(),
            ["a=b c", "d=$VERSION", "e=0.1.0", "f=0.1.0-x", "g=\"h\"", "i=j\"k"]
        );
        assert_eq!(words("${EMPTY:-dflt} ${VERSION:+set} ${MISSING:+no}x", &v).unwrap(), ["dflt", "set", "x"]);
        assert!(words("\"open", &v).is_err());
        assert!(words("${open", &v).is_err());
    }

    #[test]
    fn labels_env_and_args() {
        let mut v = BTreeMap::new();
        declare_args("VERSION=0.1.0 REVISION", &vars(&[("REVISION", "abc")]), &BTreeMap::new(), &mut v).unwrap();
        assert_eq!(v, vars(&[("VERSION", "0.1.0"), ("REVISION", "abc")]));
        declare_args("UNSET", &BTreeMap::new(), &BTreeMap::new(), &mut v).unwrap();
        assert!(!v.contains_key("UNSET"), "declared without a value stays unset");
        assert_eq!(
            key_values("LABEL", r#"a.b="x y" c=${VERSION}"#, &v).unwrap(),
            [("a.b".to_owned(), "x y".to_owned()), ("c".to_owned(), "0.1.0".to_owned())]
        );
        assert_eq!(key_values("ENV", "PATH /a b", &v).unwrap(), [("PATH".to_owned(), "/a b".to_owned())]);
        assert!(key_values("LABEL", "novalue", &v).is_err());
    }

    #[test]
    fn copy_forms() {
        let v = vars(&[("D", "/usr/local/bin")]);
        let copy = Copy::parse("--from=build --chmod=0755 --chown=65532:65532 /out/a $D/a", &v).unwrap();
        assert_eq!(copy.from.as_deref(), Some("build"));
        assert_eq!(copy.chmod, Some(0o755));
        assert_eq!(copy.chown, Some((65532, 65532)));
        assert_eq!((copy.sources.as_slice(), copy.dest.as_str()), (&["/out/a".to_owned()][..], "/usr/local/bin/a"));
        let json = Copy::parse(r#"["a b", "/c/"]"#, &v).unwrap();
        assert_eq!(json.sources, ["a b"]);
        assert!(Copy::parse("a b /c", &v).is_err(), "several sources need a directory");
        assert!(Copy::parse("--exclude=x a /b", &v).is_err(), "unknown flags are refused");
        assert!(exec_form("ENTRYPOINT", "/bin/x run").is_err());
        assert_eq!(exec_form("ENTRYPOINT", r#"["/x"]"#).unwrap(), ["/x"]);
    }
}
