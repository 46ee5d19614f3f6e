//! The Dockerfile's final stages (`FROM scratch`) interpreted without a container
//! engine: the build stage is `images/build-binaries.sh`, run here as Docker runs it there,
//! and each `COPY`, `LABEL`, `ENV`, `ARG`, `USER`, `WORKDIR`, `ENTRYPOINT` and `CMD` of a
//! final stage does what Docker's does. Anything else in a final stage is refused rather
//! than approximated, so the Dockerfile stays the one description of what is in an image.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{
    dockerfile::{self, Copy, Dockerfile, Stage},
    layer::{EXEC_MODE, Node, Store, Tree, relative},
    oci::{DEFAULT_PATH, History, ImageSpec, RunConfig},
};

/// The shared build script, which the Dockerfile's build stage runs too.
pub const BUILD_SCRIPT: &str = "images/build-binaries.sh";

/// Where cargo puts `binary` as the build script builds it, under the target directory:
/// the agent is built with the size-optimized profile `agent-image`, the others with
/// `release` (`profile_of` in the script).
pub fn built_binary(binary: &str) -> String {
    let profile = if binary == "cloudpass-agent" { "agent-image" } else { "release" };
    format!("x86_64-unknown-linux-musl/{profile}/{binary}")
}

/// A stage whose files the final stages copy from (`COPY --from=<it>`).
struct BuildStage {
    /// The folder the build script fills, inside the stage (`/out`).
    out_in_stage: String,
    /// The same folder here.
    out_here: PathBuf,
    /// The stage's working directory when it holds the build context (`COPY . .`).
    context_in_stage: Option<String>,
}

/// The Dockerfile of the repository, its final stages and the build arguments.
pub struct DockerfileImages<'a> {
    repo: &'a Path,
    file: Dockerfile,
    build_args: BTreeMap<String, String>,
}

/// The script's output folder (`images/build-binaries.sh <out>`) if `stage` runs it.
fn script_output(stage: &Stage) -> Option<String> {
    stage.all("RUN").iter().find_map(|run| {
        let words: Vec<&str> = run.split_whitespace().collect();
        let at = words.iter().position(|w| w.trim_start_matches("./") == BUILD_SCRIPT)?;
        words.get(at + 1).map(|out| out.to_string())
    })
}

impl<'a> DockerfileImages<'a> {
    /// Reads `<repo>/Dockerfile`.
    pub fn load(repo: &'a Path, build_args: BTreeMap<String, String>) -> Result<Self> {
        let path = repo.join("Dockerfile");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file = Dockerfile::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Self { repo, file, build_args })
    }

    /// The names of the final stages (`FROM scratch`): the images this Dockerfile makes.
    pub fn targets(&self) -> Vec<String> {
        self.file.scratch_stages().map(|s| s.name.clone()).collect()
    }

    /// The chain of a stage and the stages it is built `FROM`, itself first.
    fn chain(&self, name: &str) -> Vec<&Stage> {
        let mut chain = Vec::new();
        let mut current = self.file.stage(name);
        while let Some(stage) = current {
            if chain.iter().any(|s: &&Stage| s.name == stage.name) {
                break;
            }
            chain.push(stage);
            current = self.file.stage(&stage.from);
        }
        chain
    }

    /// Runs the build script for every stage the final stages copy from, once, into
    /// `binaries`. A second run is a no-op for cargo when nothing changed.
    pub fn run_build_stages(&self, targets: &[String], binaries: &Path) -> Result<()> {
        let mut sources = BTreeSet::new();
        for target in targets {
            let stage = self.file.stage(target).with_context(|| format!("no stage {target}"))?;
            for copy in stage.all("COPY") {
                if let Some(from) = Copy::parse(copy, &BTreeMap::new())?.from {
                    sources.insert(from);
                }
            }
        }
        if sources.is_empty() {
            return Ok(());
        }
        let script = self.repo.join(BUILD_SCRIPT);
        eprintln!("images: {} {} (cargo, static musl release build)", BUILD_SCRIPT, binaries.display());
        let started = std::time::Instant::now();
        let status = Command::new(&script)
            .arg(binaries)
            .current_dir(self.repo)
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{BUILD_SCRIPT} failed ({status})");
        }
        eprintln!("images: binaries ready in {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    }

    fn build_stage(&self, name: &str, binaries: &Path) -> Result<BuildStage> {
        let chain = self.chain(name);
        if chain.is_empty() {
            bail!("COPY --from={name}: no such stage (copying from other images needs a container engine)");
        }
        let out_in_stage = chain.iter().find_map(|s| script_output(s)).with_context(|| {
            format!("stage {name} does not run `{BUILD_SCRIPT} <out dir>`, the only build step done without Docker")
        })?;
        // The stage's WORKDIR holds the build context if the chain copies `.` into it.
        let mut context_in_stage = None;
        for stage in chain.iter().rev() {
            let mut workdir = "/".to_owned();
            for instruction in &stage.instructions {
                match instruction.keyword.as_str() {
                    "WORKDIR" => workdir = instruction.args.clone(),
                    "COPY" => {
                        let copy = Copy::parse(&instruction.args, &BTreeMap::new())?;
                        if copy.from.is_none() && copy.sources == ["."] && matches!(copy.dest.as_str(), "." | "./") {
                            context_in_stage = Some(workdir.clone());
                        }
                    }
                    _ => {}
                }
            }
        }
        // Other files of the build stage (CA certificates) are the same Debian package's
        // as this machine's, if this machine runs the same Debian release.
        let base = chain.last().map(|s| s.from.as_str()).unwrap_or_default();
        if let Some(codename) = base.rsplit('-').next().filter(|c| base.contains(':') && !c.contains(':')) {
            let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
            if !os_release.lines().any(|l| l == format!("VERSION_CODENAME={codename}")) {
                eprintln!(
                    "images: warning: the build stage is {base} but this machine is not Debian {codename}: \
                     files copied from the build stage other than the binaries come from this machine"
                );
            }
        }
        Ok(BuildStage { out_in_stage, out_here: binaries.to_owned(), context_in_stage })
    }

    /// Where the file `path` of the build stage is on this machine.
    fn locate(&self, stage: &BuildStage, path: &str) -> Result<PathBuf> {
        if !path.starts_with('/') {
            bail!("COPY --from: {path} must be absolute");
        }
        let under = |dir: &str| {
            let dir = dir.trim_end_matches('/');
            path.strip_prefix(dir).filter(|rest| rest.is_empty() || rest.starts_with('/')).map(relative)
        };
        if let Some(rest) = under(&stage.out_in_stage) {
            return Ok(stage.out_here.join(rest?));
        }
        if let Some(context) = &stage.context_in_stage
            && let Some(rest) = under(context)
        {
            return Ok(self.repo.join(rest?));
        }
        Ok(PathBuf::from(path))
    }

    /// The image of final stage `target`, named `name`, its layers stored in `store`.
    pub fn image(&self, target: &str, name: &str, binaries: &Path, store: &Store, epoch: i64) -> Result<ImageSpec> {
        let stage = self.file.stage(target).with_context(|| format!("the Dockerfile has no stage {target}"))?;
        if stage.from != "scratch" {
            bail!("stage {target}: only FROM scratch is assembled without a container engine, not FROM {}", stage.from);
        }
        let globals = self.file.global_values(&self.build_args)?;
        let mut vars = BTreeMap::new();
        let mut config = RunConfig { env: vec![DEFAULT_PATH.to_owned()], ..Default::default() };
        let mut spec = ImageSpec {
            name: name.to_owned(),
            tag_from_content: false,
            layers: Vec::new(),
            config: RunConfig::default(),
            history: Vec::new(),
            created: epoch,
        };
        let mut workdir = "/".to_owned();
        // Paths present in the layers so far, to know whether WORKDIR must create one.
        let mut present: BTreeSet<String> = BTreeSet::new();
        let mtime = epoch.max(0) as u64;
        for instruction in &stage.instructions {
            let context =
                || format!("Dockerfile line {}: {} {}", instruction.line, instruction.keyword, instruction.args);
            let mut layer_tree = None;
            match instruction.keyword.as_str() {
                "ARG" => dockerfile::declare_args(&instruction.args, &self.build_args, &globals, &mut vars)
                    .with_context(context)?,
                "ENV" => {
                    for (key, value) in dockerfile::key_values("ENV", &instruction.args, &vars).with_context(context)? {
                        config.env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key.as_str()));
                        config.env.push(format!("{key}={value}"));
                        vars.insert(key, value);
                    }
                }
                "LABEL" => {
                    for (key, value) in
                        dockerfile::key_values("LABEL", &instruction.args, &vars).with_context(context)?
                    {
                        config.labels.insert(key, value);
                    }
                }
                "USER" => config.user = Some(dockerfile::expand_only(&instruction.args, &vars)?),
                "ENTRYPOINT" => {
                    config.entrypoint = Some(dockerfile::exec_form("ENTRYPOINT", &instruction.args)?);
                    // As in Docker, a new ENTRYPOINT drops a CMD set before it.
                    config.cmd = None;
                }
                "CMD" => config.cmd = Some(dockerfile::exec_form("CMD", &instruction.args)?),
                "WORKDIR" => {
                    let dir = dockerfile::expand_only(&instruction.args, &vars)?;
                    workdir =
                        if dir.starts_with('/') { dir } else { format!("{}/{dir}", workdir.trim_end_matches('/')) };
                    config.working_dir = Some(workdir.clone());
                    let path = relative(&workdir)?;
                    if !path.is_empty() && !present.contains(&path) {
                        let mut tree = Tree::new();
                        tree.insert(&workdir, Node::Dir, EXEC_MODE)?;
                        layer_tree = Some(tree);
                    }
                }
                "COPY" => {
                    let copy = Copy::parse(&instruction.args, &vars).with_context(context)?;
                    let tree = self.copy_tree(&copy, &workdir, binaries).with_context(context)?;
                    layer_tree = Some(tree);
                }
                other => bail!(
                    "Dockerfile line {}: {other} in the final stage {target} is not supported: a FROM scratch image \
                     has no shell, and the local assembler does only what Docker would do",
                    instruction.line
                ),
            }
            let raw = format!("{} {}", instruction.keyword, instruction.args);
            match layer_tree {
                Some(tree) => {
                    for path in tree.paths() {
                        let mut prefix = String::new();
                        for part in path.split('/') {
                            if !prefix.is_empty() {
                                prefix.push('/');
                            }
                            prefix.push_str(part);
                            present.insert(prefix.clone());
                        }
                    }
                    spec.layers.push(store.layer(&tree, mtime)?);
                    spec.history.push(History { created_by: raw, empty_layer: false });
                }
                None => spec.history.push(History { created_by: raw, empty_layer: true }),
            }
        }
        spec.config = config;
        Ok(spec)
    }

    /// The files one `COPY` adds, with Docker's rules for the destination: a trailing `/`
    /// (or several sources) makes it a directory that receives each source by name; a
    /// directory source copies its contents.
    fn copy_tree(&self, copy: &Copy, workdir: &str, binaries: &Path) -> Result<Tree> {
        let stage = match &copy.from {
            Some(from) => Some(self.build_stage(from, binaries)?),
            None => None,
        };
        let dest = if copy.dest.starts_with('/') {
            copy.dest.clone()
        } else {
            format!("{}/{}", workdir.trim_end_matches('/'), copy.dest)
        };
        let mut tree = Tree::new();
        for source in &copy.sources {
            if source.contains(['*', '?', '[']) {
                bail!("COPY {source}: wildcards are not supported; name the files");
            }
            let local = match &stage {
                Some(stage) => self.locate(stage, source)?,
                None => {
                    let rel = relative(source)?;
                    if rel.split('/').next() == Some("target") {
                        bail!("COPY {source}: target/ is not in the build context (.dockerignore)");
                    }
                    self.repo.join(rel)
                }
            };
            let metadata =
                fs::metadata(&local).with_context(|| format!("COPY {source}: {} is missing", local.display()))?;
            let target = if metadata.is_file() && (dest.ends_with('/') || copy.sources.len() > 1) {
                let name = local.file_name().and_then(|n| n.to_str()).context("a source file name")?;
                format!("{}/{name}", dest.trim_end_matches('/'))
            } else {
                dest.clone()
            };
            tree.copy_from_host(&local, &target, copy.chmod, copy.chown)?;
        }
        Ok(tree)
    }
}
