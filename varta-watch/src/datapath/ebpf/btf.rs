//! The running kernel's structure layout, for task_read attestation: where `task_struct.tgid`,
//! `task_struct.thread_pid` and `pid.level` sit, read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`) with the btf-rs parser. The offsets differ per kernel build
//! (`task_struct.tgid` is at 2236 on Debian's 5.10, 1268 on 6.18).

use std::path::Path;

use btf_rs::{Btf, Type};
use varta_common::filter::TaskOffsets;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("the kernel publishes no BTF ({VMLINUX} is missing: CONFIG_DEBUG_INFO_BTF is off)")]
    Missing,
    #[error("reading {VMLINUX}: {0}")]
    Parse(#[from] btf_rs::Error),
    #[error("the kernel's BTF has no {0}.{1}")]
    NoMember(&'static str, &'static str),
}

pub fn task_offsets() -> Result<TaskOffsets, BtfError> {
    if !Path::new(VMLINUX).exists() {
        return Err(BtfError::Missing);
    }
    let btf = Btf::from_file(VMLINUX)?;
    Ok(TaskOffsets {
        task_tgid: member_offset(&btf, "task_struct", "tgid")?,
        task_thread_pid: member_offset(&btf, "task_struct", "thread_pid")?,
        pid_level: member_offset(&btf, "pid", "level")?,
        task_group_leader: member_offset(&btf, "task_struct", "group_leader")?,
        task_start_boottime: member_offset(&btf, "task_struct", "start_boottime")?,
        _pad: 0,
    })
}

/// Byte offset of `member` in struct `name`, looking into anonymous struct and union members
/// (layout-randomisation groups and the like).
fn member_offset(btf: &Btf, name: &'static str, member: &'static str) -> Result<u32, BtfError> {
    for ty in btf.resolve_types_by_name(name)? {
        if let Type::Struct(s) = ty
            && let Some(bits) = find(btf, &s, member, 0)?
        {
            return Ok(bits / 8);
        }
    }
    Err(BtfError::NoMember(name, member))
}

fn find(
    btf: &Btf,
    s: &btf_rs::Struct,
    member: &str,
    base_bits: u32,
) -> Result<Option<u32>, BtfError> {
    for m in &s.members {
        let name = btf.resolve_name(m)?;
        let at = base_bits + m.bit_offset();
        if name == member {
            return Ok(Some(at));
        }
        if name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = btf.resolve_chained_type(m)?
            && let Some(found) = find(btf, &inner, member, at)?
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_kernels_task_offsets() {
        if !Path::new(VMLINUX).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{VMLINUX} is missing on the CI machine"
            );
            eprintln!("skipping: {VMLINUX} is missing on this kernel");
            return;
        }
        let offsets = task_offsets().unwrap();
        // tgid follows pid (both pid_t) in every task_struct layout.
        let btf = Btf::from_file(VMLINUX).unwrap();
        assert_eq!(
            offsets.task_tgid,
            member_offset(&btf, "task_struct", "pid").unwrap() + 4
        );
        assert!(offsets.task_thread_pid > offsets.task_tgid);
        // struct pid starts with refcount_t count, then unsigned int level.
        assert_eq!(offsets.pid_level, 4);
    }
}
