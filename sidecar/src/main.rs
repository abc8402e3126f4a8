//! agentvm-sidecar: the in-pod tool-call proxy, exec server and exec dispatcher (see issue 3).

fn main() {
    eprintln!("agentvm-sidecar: not built yet in this revision");
    std::process::exit(64);
}
