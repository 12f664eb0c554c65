//! The template's CPU for its memory: Lambda gives a function CPU in proportion to its memory
//! (1,769 MB is one vCPU), so the template's 512 MB is 0.289 of a core. Where the machine allows
//! it (a writable cgroup with the cpu controller, v1 or v2), the measured process runs under a
//! CFS quota of that share; elsewhere it runs unheld and the bench says so.

use std::path::{Path, PathBuf};
use std::process::Command;

/// 512 MB's share of a core.
pub const SHARE_512_MB: f64 = 512.0 / 1769.0;
const GROUP: &str = "ecom-settings-bench";
const PERIOD_US: u64 = 100_000;

/// The group's directory, its quota set to `share` of a core, or why it could not be.
fn group(share: f64) -> Result<PathBuf, String> {
    let quota = (share * PERIOD_US as f64).round() as u64;
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    let (dir, files) = if v1.join("cpu.cfs_quota_us").exists() {
        let dir = v1.join(GROUP);
        let files = vec![
            ("cpu.cfs_period_us", PERIOD_US.to_string()),
            ("cpu.cfs_quota_us", quota.to_string()),
        ];
        (dir, files)
    } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let dir = Path::new("/sys/fs/cgroup").join(GROUP);
        (dir, vec![("cpu.max", format!("{quota} {PERIOD_US}"))])
    } else {
        return Err("no cgroup cpu controller here".into());
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (file, value) in files {
        let path = dir.join(file);
        std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(dir)
}

/// A command that puts itself in the group and then runs the program given as its first
/// argument, or why the share cannot be held here.
pub fn wrapper(share: f64) -> Result<Command, String> {
    let dir = group(share)?;
    let mut command = Command::new("sh");
    let join = format!(
        "echo $$ > '{}' && exec \"$0\"",
        dir.join("cgroup.procs").display()
    );
    command.arg("-c").arg(join);
    Ok(command)
}

/// What the bench prints about the CPU the function ran with.
pub fn describe(share: Option<f64>) -> String {
    match share.map(|s| (s, group(s))) {
        Some((s, Ok(dir))) => format!(
            "CPU held to {s:.3} of a core (the template's 512 MB; CFS quota, {})",
            dir.display()
        ),
        Some((_, Err(why))) => format!("CPU not held ({why}): a whole core"),
        None => "CPU not held (--cpu-share none): a whole core".into(),
    }
}
