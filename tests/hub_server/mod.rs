//! A stand-in for the Hugging Face Hub on the loopback interface, for the
//! download tests: the endpoints the tools call, answered as the hub
//! answers them (status codes, `X-Error-Code`, `X-Repo-Commit`, `ETag`,
//! redirects of LFS files to a storage server on another origin, `Range`),
//! with faults to inject (a connection cut at a byte, a corrupted body) and
//! a log of every request. Written from the protocol, not from the client.

use sha1::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One commit's files.
pub type Files = BTreeMap<String, Vec<u8>>;

/// A repository: commits by hash, branches and tags by name.
#[derive(Default, Clone)]
pub struct Repo {
    pub commits: BTreeMap<String, Files>,
    pub refs: BTreeMap<String, String>,
    pub gated: bool,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `hub` or `cdn`: which origin it reached.
    pub origin: &'static str,
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    /// The token gated repositories accept.
    token: Option<String>,
    /// File name -> the byte after which every transfer of it is cut.
    cut_at: BTreeMap<String, u64>,
    /// File names whose bodies are served with one byte changed.
    corrupt: BTreeSet<String>,
    /// File name -> how many more requests for it get a 503.
    busy: BTreeMap<String, u32>,
    log: Vec<Request>,
}

/// A running server; stopped when dropped.
pub struct Hub {
    state: Arc<Mutex<State>>,
    hub_port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ports: Vec<u16>,
}

/// git's blob hash: sha1 of "blob <len>\0" and the content.
pub fn git_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the hub would store `name` with LFS (weights do).
pub fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin")
}

impl Hub {
    /// Starts the hub and its storage origin on two loopback ports.
    pub fn start() -> Hub {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let (hub_port, cdn_port) = (
            hub.local_addr().unwrap().port(),
            cdn.local_addr().unwrap().port(),
        );
        let mut threads = Vec::new();
        for (listener, origin) in [(hub, "hub"), (cdn, "cdn")] {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || serve(conn, origin, &state, cdn_port));
                }
            }));
        }
        Hub {
            state,
            hub_port,
            stop,
            threads,
            ports: vec![hub_port, cdn_port],
        }
    }

    /// What `HF_ENDPOINT` should be.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.hub_port)
    }

    /// Publishes the top-level files of `dir` (plus `extra`) as a commit of
    /// `repo`, pointed to by `branch`; returns the commit hash.
    pub fn publish(&self, repo: &str, branch: &str, dir: &Path, extra: &[(&str, &[u8])]) -> String {
        let mut files = Files::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
        for (name, bytes) in extra {
            files.insert(name.to_string(), bytes.to_vec());
        }
        let mut h = sha1::Sha1::new();
        h.update(repo.as_bytes());
        for (n, b) in &files {
            h.update(n.as_bytes());
            h.update(b);
        }
        let commit = hex(&h.finalize());
        let mut st = self.state.lock().unwrap();
        let r = st.repos.entry(repo.to_string()).or_default();
        r.commits.insert(commit.clone(), files);
        r.refs.insert(branch.to_string(), commit.clone());
        commit
    }

    /// Marks `repo` gated: files need `Authorization: Bearer <token>`.
    pub fn gate(&self, repo: &str, token: &str) {
        let mut st = self.state.lock().unwrap();
        st.repos.get_mut(repo).unwrap().gated = true;
        st.token = Some(token.to_string());
    }

    /// Cuts every transfer of `file` after byte `at`.
    pub fn cut(&self, file: &str, at: u64) {
        self.state.lock().unwrap().cut_at.insert(file.into(), at);
    }

    /// Serves `file` with one byte changed.
    pub fn corrupt(&self, file: &str) {
        self.state.lock().unwrap().corrupt.insert(file.into());
    }

    /// Answers the next `times` requests for `file` with 503.
    pub fn busy(&self, file: &str, times: u32) {
        self.state.lock().unwrap().busy.insert(file.into(), times);
    }

    /// Removes every fault.
    pub fn heal(&self) {
        let mut st = self.state.lock().unwrap();
        st.cut_at.clear();
        st.corrupt.clear();
        st.busy.clear();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for port in &self.ports {
            let _ = TcpStream::connect(("127.0.0.1", *port));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A response: status, headers, body; `cut` ends the body early.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Total length announced (the full body's, also when cut).
    length: usize,
    cut: Option<usize>,
}

impl Answer {
    fn new(status: u16, body: Vec<u8>) -> Self {
        let length = body.len();
        Answer {
            status,
            headers: Vec::new(),
            body,
            length,
            cut: None,
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut a = Answer::new(status, format!("{{\"error\":\"{message}\"}}").into_bytes());
        a.headers.push(("X-Error-Code".into(), code.into()));
        a.headers.push(("X-Error-Message".into(), message.into()));
        a
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

fn serve(conn: TcpStream, origin: &'static str, state: &Mutex<State>, cdn_port: u16) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let req = Request {
        origin,
        method: method.clone(),
        path: path.clone(),
        headers,
    };
    let answer = {
        let mut st = state.lock().unwrap();
        st.log.push(req.clone());
        let file = path.rsplit('/').next().unwrap_or("").to_string();
        match st.busy.get_mut(&file) {
            Some(n) if *n > 0 && path.contains("/resolve/") => {
                *n -= 1;
                Answer::new(503, b"busy".to_vec())
            }
            _ => answer(&st, &req, cdn_port),
        }
    };
    let _ = write(conn, &method, answer);
}

fn write(mut conn: TcpStream, method: &str, a: Answer) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", a.status);
    for (k, v) in &a.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", a.length));
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        let end = a.cut.unwrap_or(a.body.len()).min(a.body.len());
        conn.write_all(&a.body[..end])?;
    }
    conn.flush()?;
    conn.shutdown(std::net::Shutdown::Both)
}

/// The file of `repo` at `rev` (a branch or a commit), or the error the
/// hub gives.
fn find<'a>(
    st: &'a State,
    req: &Request,
    repo: &str,
    rev: &str,
) -> Result<(&'a Repo, String), Answer> {
    let authorized = req.headers.contains_key("authorization");
    let Some(r) = st.repos.get(repo) else {
        // Without a token the hub cannot tell private from missing: 401.
        let status = if authorized { 404 } else { 401 };
        return Err(Answer::error(
            status,
            "RepoNotFound",
            "Repository not found",
        ));
    };
    let commit = match r.refs.get(rev) {
        Some(c) => c.clone(),
        None if r.commits.contains_key(rev) => rev.to_string(),
        None => return Err(Answer::error(404, "RevisionNotFound", "Invalid rev id")),
    };
    Ok((r, commit))
}

fn answer(st: &State, req: &Request, cdn_port: u16) -> Answer {
    let decode = |s: &str| s.replace("%2F", "/").replace("%20", " ");
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match (req.origin, segs.as_slice()) {
        ("hub", ["api", "models", org, name, "revision", rev]) => {
            let repo = format!("{org}/{name}");
            let (r, commit) = match find(st, req, &repo, &decode(rev)) {
                Ok(x) => x,
                Err(a) => return a,
            };
            let siblings: Vec<serde_json::Value> = r.commits[&commit]
                .iter()
                .map(|(n, b)| {
                    let mut s = serde_json::json!({
                        "rfilename": n, "size": b.len(), "blobId": git_sha1(b)
                    });
                    if is_lfs(n) {
                        s["lfs"] = serde_json::json!({
                            "sha256": sha256(b), "size": b.len(), "pointerSize": 134
                        });
                    }
                    s
                })
                .collect();
            let gated = if r.gated {
                serde_json::json!("manual")
            } else {
                serde_json::json!(false)
            };
            let body = serde_json::json!({
                "id": repo, "sha": commit, "private": false, "gated": gated, "siblings": siblings
            });
            Answer::new(200, body.to_string().into_bytes())
                .header("Content-Type", "application/json")
        }
        ("hub", [org, name, "resolve", rev, file @ ..]) => {
            let repo = format!("{org}/{name}");
            let file = decode(&file.join("/"));
            let (r, commit) = match find(st, req, &repo, &decode(rev)) {
                Ok(x) => x,
                Err(a) => return a,
            };
            if r.gated {
                let sent = req.headers.get("authorization");
                let ok = st
                    .token
                    .as_ref()
                    .is_some_and(|t| sent == Some(&format!("Bearer {t}")));
                if !ok {
                    return Answer::error(
                        if sent.is_some() { 403 } else { 401 },
                        "GatedRepo",
                        "Access to model is restricted. You must have access to it and be authenticated to access it. Please log in.",
                    );
                }
            }
            let Some(bytes) = r.commits[&commit].get(&file) else {
                return Answer::error(404, "EntryNotFound", "Entry not found");
            };
            if is_lfs(&file) {
                let sha = sha256(bytes);
                return Answer::new(302, Vec::new())
                    .header(
                        "Location",
                        format!("http://127.0.0.1:{cdn_port}/cdn/{sha}?name={file}"),
                    )
                    .header("X-Repo-Commit", commit)
                    .header("X-Linked-Etag", format!("\"{sha}\""))
                    .header("X-Linked-Size", bytes.len().to_string());
            }
            body(st, req, &file, bytes)
                .header("X-Repo-Commit", commit)
                .header("ETag", format!("\"{}\"", git_sha1(bytes)))
        }
        ("cdn", ["cdn", sha]) => {
            let found = st
                .repos
                .values()
                .flat_map(|r| r.commits.values())
                .flat_map(|f| f.iter())
                .find(|(_, b)| sha256(b) == *sha);
            match found {
                Some((name, bytes)) => body(st, req, name, bytes),
                None => Answer::new(404, b"no such object".to_vec()),
            }
        }
        _ => Answer::new(404, b"not found".to_vec()),
    }
}

/// The body of `name`, honouring `Range: bytes=N-` and the faults set.
fn body(st: &State, req: &Request, name: &str, bytes: &[u8]) -> Answer {
    let mut content = bytes.to_vec();
    if st.corrupt.contains(name) && !content.is_empty() {
        let mid = content.len() / 2;
        content[mid] ^= 0x5a;
    }
    let start = req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let cut = st.cut_at.get(name).map(|&c| c as usize);
    let total = content.len();
    let mut a = match start {
        Some(s) if s < total => {
            let mut a = Answer::new(206, content[s..].to_vec());
            a.headers.push((
                "Content-Range".into(),
                format!("bytes {s}-{}/{total}", total - 1),
            ));
            a.cut = cut.map(|c| c.saturating_sub(s));
            a
        }
        Some(_) => return Answer::new(416, Vec::new()),
        None => {
            let mut a = Answer::new(200, content);
            a.cut = cut;
            a
        }
    };
    a.headers.push(("Accept-Ranges".into(), "bytes".into()));
    a
}
