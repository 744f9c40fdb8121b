//! Driving the Docker engine for the stack tests: images, a Compose project, a Swarm stack.
//! Every project and stack is named after the test process and removed, with its volumes,
//! when the value that started it is dropped.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether an engine answers, and why not.
pub fn docker_ok() -> Result<(), String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Err(format!("docker: {e}")),
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `docker ARGS`, which must succeed; its standard output.
pub fn docker(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(Command::new("docker").args(args)).stdout).into_owned()
}

/// The images, from this build's binaries (the `services` binary's folder holds `gateway` too:
/// `cargo test --workspace` builds both before running any test).
pub fn build_images() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_services"))
        .parent()
        .expect("bin dir");
    assert!(
        bin_dir.join("gateway").is_file(),
        "no gateway binary in {}",
        bin_dir.display()
    );
    run(Command::new(root().join("tests/compose/build-images")).arg(bin_dir));
}

/// The environment docker-compose.yml needs: passwords, and every published port chosen by
/// the engine.
fn stack_env(cmd: &mut Command) -> &mut Command {
    cmd.current_dir(root())
        .env("POSTGRES_PASSWORD", "stack-test-password")
        .env("GRAFANA_ADMIN_PASSWORD", "unused")
        .env("ADMIN_EMAILS", "admin@example.com")
        .env("GATEWAY_HTTP_PORT", "127.0.0.1:0")
        .env("GATEWAY_HTTPS_PORT", "127.0.0.1:0")
        .env("GATEWAY_ADMIN_PORT", "0")
        .env("PROMETHEUS_PORT", "0")
        .env("GRAFANA_PORT", "0")
}

/// The addresses `containers` have on `network`.
pub fn container_ips(containers: &[String], network: &str) -> BTreeSet<String> {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    containers
        .iter()
        .map(|id| docker(&["inspect", "-f", &format, id]).trim().to_string())
        .filter(|ip| !ip.is_empty())
        .collect()
}

/// Running containers with `label`.
fn containers_labelled(labels: &[String]) -> Vec<String> {
    let mut args = vec!["ps".to_string(), "-q".to_string()];
    for label in labels {
        args.extend(["--filter".to_string(), format!("label={label}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The `host:port` a container publishes `port` on.
fn published(container: &str, port: u16) -> String {
    let out = docker(&["port", container, &format!("{port}/tcp")]);
    let first = out
        .lines()
        .find(|l| l.contains("0.0.0.0") || l.contains("127.0.0.1"))
        .unwrap_or_default();
    let port = first.rsplit(':').next().unwrap_or_default().trim();
    format!("127.0.0.1:{port}")
}

/// Calls `done` every second until it says yes; past `within`, fails with the state it gave.
fn poll(within: Duration, mut done: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match done() {
            Ok(()) => return,
            Err(state) => assert!(
                Instant::now() < deadline,
                "not ready within {within:?}:\n{state}"
            ),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A Compose project of docker-compose.yml with the local images.
pub struct Compose {
    command: Vec<String>,
    files: Vec<PathBuf>,
    project: String,
    scratch: tempfile::TempDir,
}

impl Compose {
    /// `up -d` of the whole file, with Compose v2 when present, else docker-compose 1.29 (with
    /// `--compatibility` for `deploy.replicas`, and the file without its top-level `name:`,
    /// which 1.29 does not know; the project is named on the command line either way).
    pub fn up() -> Compose {
        let scratch = tempfile::tempdir().expect("tempdir");
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        let (command, main) = if v2 {
            (
                vec!["docker".into(), "compose".into()],
                root().join("docker-compose.yml"),
            )
        } else {
            let text =
                std::fs::read_to_string(root().join("docker-compose.yml")).expect("compose file");
            let without_name: String = text
                .lines()
                .filter(|l| !l.starts_with("name:"))
                .map(|l| format!("{l}\n"))
                .collect();
            let copy = scratch.path().join("docker-compose.yml");
            std::fs::write(&copy, without_name).expect("copy");
            (
                vec!["docker-compose".into(), "--compatibility".into()],
                copy,
            )
        };
        // The gateway's configuration folder: a copy of gateway.yaml that a test may replace.
        let conf = scratch.path().join("conf");
        std::fs::create_dir(&conf).expect("conf dir");
        std::fs::copy(root().join("gateway.yaml"), conf.join("gateway.yaml")).expect("copy");
        // The gateway runs as 65532 in its container.
        for (path, mode) in [(&conf, 0o755), (&conf.join("gateway.yaml"), 0o644)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let stack = Compose {
            command,
            files: vec![main, root().join("tests/compose/local-images.yml")],
            project: format!("shop-test-{}", std::process::id()),
            scratch,
        };
        // Every service but Grafana, whose image cannot be had here (local-images.yml).
        let services = stack.run(&["config", "--services"]);
        let mut up = vec!["up", "-d", "--no-build"];
        up.extend(services.split_whitespace().filter(|s| *s != "grafana"));
        stack.run(&up);
        stack
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .arg("--project-directory")
            .arg(root());
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.args(["-p", &self.project]);
        stack_env(&mut cmd).env("GATEWAY_CONFIG_DIR", self.config_dir());
        cmd
    }

    /// The folder mounted as the gateway's configuration folder.
    pub fn config_dir(&self) -> PathBuf {
        self.scratch.path().join("conf")
    }

    pub fn run(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&run(self.cmd().args(args)).stdout).into_owned()
    }

    /// Running containers of `service`.
    pub fn containers(&self, service: &str) -> Vec<String> {
        containers_labelled(&[
            format!("com.docker.compose.project={}", self.project),
            format!("com.docker.compose.service={service}"),
        ])
    }

    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }

    /// Where `service` publishes `port`.
    pub fn port(&self, service: &str, port: u16) -> String {
        let id = self
            .containers(service)
            .into_iter()
            .next()
            .expect("container");
        published(&id, port)
    }

    /// Waits until every container has passed its health check (and `certs` has finished).
    pub fn wait_healthy(&self, within: Duration) {
        let project = format!("label=com.docker.compose.project={}", self.project);
        poll(within, || {
            let out = docker(&[
                "ps",
                "-a",
                "--filter",
                &project,
                "--format",
                "{{.Names}} {{.Status}}",
            ]);
            let waiting = out.lines().any(|l| {
                !(l.contains("(healthy)") || l.contains("certs") && l.contains("Exited (0)"))
            });
            (!waiting && out.lines().count() >= 16)
                .then_some(())
                .ok_or(out)
        });
    }

    pub fn scale(&self, service: &str, replicas: u32) {
        self.run(&[
            "up",
            "-d",
            "--no-build",
            "--no-deps",
            "--no-recreate",
            "--scale",
            &format!("{service}={replicas}"),
            service,
        ]);
    }

    /// ca.pem from the certificates volume.
    pub fn ca_pem(&self) -> String {
        let volume = format!("{}_gateway-certs:/certs:ro", self.project);
        docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &volume,
            "shop-local/debian:bookworm",
            "cat",
            "/certs/ca.pem",
        ])
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

/// docker-compose.yml deployed as a Swarm stack (scripts/swarm-stack), on this engine made a
/// one-node swarm for the test when it is not one already.
pub struct Swarm {
    name: String,
    joined: bool,
    _scratch: tempfile::TempDir,
}

impl Swarm {
    pub fn deploy() -> Swarm {
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        let joined = state.trim() == "inactive";
        if joined {
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        }
        let scratch = tempfile::tempdir().expect("tempdir");
        let stack_file = scratch.path().join("stack.yml");
        let out =
            run(Command::new(root().join("scripts/swarm-stack"))
                .arg(root().join("docker-compose.yml")));
        std::fs::write(&stack_file, &out.stdout).expect("stack file");
        let swarm = Swarm {
            name: format!("shop-swarm-{}", std::process::id()),
            joined,
            _scratch: scratch,
        };
        let mut cmd = Command::new("docker");
        cmd.args(["stack", "deploy", "--resolve-image", "never", "-c"])
            .arg(&stack_file)
            .arg("-c")
            .arg(root().join("tests/compose/local-images.yml"))
            .arg(&swarm.name);
        // Host-mode ports: port 0 lets the engine choose.
        stack_env(&mut cmd)
            .env("GATEWAY_HTTP_PORT", "0")
            .env("GATEWAY_HTTPS_PORT", "0");
        run(&mut cmd);
        swarm
    }

    /// Running containers of `service`.
    pub fn containers(&self, service: &str) -> Vec<String> {
        containers_labelled(&[format!(
            "com.docker.swarm.service.name={}_{service}",
            self.name
        )])
    }

    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.name)
    }

    pub fn port(&self, service: &str, port: u16) -> String {
        let id = self
            .containers(service)
            .into_iter()
            .next()
            .expect("container");
        published(&id, port)
    }

    /// Waits until every service runs all its replicas, healthy.
    pub fn wait_running(&self, within: Duration) {
        let stack = format!("label=com.docker.stack.namespace={}", self.name);
        poll(within, || {
            let services = docker(&[
                "service",
                "ls",
                "--filter",
                &stack,
                "--format",
                "{{.Name}} {{.Replicas}}",
            ]);
            let short = services.lines().any(|l| {
                let Some((running, wanted)) = l.rsplit(' ').next().and_then(|r| r.split_once('/'))
                else {
                    return true;
                };
                running != wanted && !l.contains("_certs ")
            });
            let tasks = docker(&[
                "ps",
                "--filter",
                &stack,
                "--format",
                "{{.Names}} {{.Status}}",
            ]);
            let starting = tasks.lines().any(|l| !l.contains("(healthy)"));
            (!short && !starting && services.lines().count() >= 9)
                .then_some(())
                .ok_or(format!("{services}\n{tasks}"))
        });
    }

    pub fn scale(&self, service: &str, replicas: u32) {
        docker(&[
            "service",
            "scale",
            "--detach=false",
            &format!("{}_{service}={replicas}", self.name),
        ]);
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["stack", "rm", &self.name])
            .output();
        // Volumes can go once the stack's containers have.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let left = Command::new("docker")
                .args([
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=com.docker.stack.namespace={}", self.name),
                ])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default();
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Ok(out) = Command::new("docker")
            .args([
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("label=com.docker.stack.namespace={}", self.name),
            ])
            .output()
        {
            for volume in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker")
                    .args(["volume", "rm", volume])
                    .output();
            }
        }
        if self.joined {
            let _ = Command::new("docker")
                .args(["swarm", "leave", "--force"])
                .output();
            // Made by `swarm init`, left behind by `swarm leave`.
            let _ = Command::new("docker")
                .args(["network", "rm", "docker_gwbridge"])
                .output();
        }
    }
}
