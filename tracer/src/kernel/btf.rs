//! Struct offsets and function prototypes, resolved from the kernel's BTF
//! (vmlinux, plus KVM's split BTF when KVM is a module). Nothing here is
//! hard-coded: a field the kernel lacks is reported absent, with the reason.

use serde::Serialize;

use super::btf_reader::{Btf, Type, kind};

use common::{KernelOffsets, OFFSET_ABSENT};

/// The shape a field must have for the probes to read it.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// A pointer.
    Ptr,
    /// An integer (or enum) of this many bytes.
    Int(usize),
    /// A 4-byte integer or a 4-byte union/struct (`kvm_mmu_page_role`).
    Word4,
    /// An array of pointers; the offset is that of element 0.
    PtrArray,
    /// An embedded struct.
    Struct,
}

/// One field the probes read.
struct FieldSpec {
    /// Name in the plan and in `doctor`, e.g. `kvm_mmu.mirror_root_hpa`.
    name: &'static str,
    strukt: &'static str,
    path: &'static str,
    shape: Shape,
    /// Why a missing field matters (used in its reason).
    missing_means: &'static str,
    set: fn(&mut KernelOffsets, u32),
}

const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        name: "kvm_vcpu.kvm",
        strukt: "kvm_vcpu",
        path: "kvm",
        shape: Shape::Ptr,
        missing_means: "VM identity of vCPU events is unknown",
        set: |o, v| o.vcpu_kvm = v,
    },
    FieldSpec {
        name: "kvm_vcpu.vcpu_id",
        strukt: "kvm_vcpu",
        path: "vcpu_id",
        shape: Shape::Int(4),
        missing_means: "vCPU ids are unknown",
        set: |o, v| o.vcpu_vcpu_id = v,
    },
    FieldSpec {
        name: "kvm_vcpu.arch.mmu",
        strukt: "kvm_vcpu",
        path: "arch.mmu",
        shape: Shape::Ptr,
        missing_means: "no root can be read",
        set: |o, v| o.vcpu_arch_mmu = v,
    },
    FieldSpec {
        name: "kvm_vcpu.arch.root_mmu",
        strukt: "kvm_vcpu",
        path: "arch.root_mmu",
        shape: Shape::Struct,
        missing_means: "the kvm_entry gate reads the roots in two steps",
        set: |o, v| o.vcpu_arch_root_mmu = v,
    },
    FieldSpec {
        name: "kvm_mmu.root.hpa",
        strukt: "kvm_mmu",
        path: "root.hpa",
        shape: Shape::Int(8),
        missing_means: "the direct root can't be read",
        set: |o, v| o.mmu_root_hpa = v,
    },
    FieldSpec {
        name: "kvm_mmu.root.pgd",
        strukt: "kvm_mmu",
        path: "root.pgd",
        shape: Shape::Int(8),
        missing_means: "the root pgd can't be read",
        set: |o, v| o.mmu_root_pgd = v,
    },
    FieldSpec {
        name: "kvm_mmu.mirror_root_hpa",
        strukt: "kvm_mmu",
        path: "mirror_root_hpa",
        shape: Shape::Int(8),
        missing_means: "mirror-root tracking is off (the field arrived in Linux 6.14)",
        set: |o, v| o.mmu_mirror_root_hpa = v,
    },
    FieldSpec {
        name: "kvm_mmu.root_role",
        strukt: "kvm_mmu",
        path: "root_role",
        shape: Shape::Word4,
        missing_means: "the root role can't be read",
        set: |o, v| o.mmu_root_role = v,
    },
    FieldSpec {
        name: "kvm.arch.vm_type",
        strukt: "kvm",
        path: "arch.vm_type",
        shape: Shape::Int(1),
        missing_means: "VM types are unknown, so TDX VMs can't be told apart",
        set: |o, v| o.kvm_vm_type = v,
    },
    FieldSpec {
        name: "kvm.arch.mmu_valid_gen",
        strukt: "kvm",
        path: "arch.mmu_valid_gen",
        shape: Shape::Int(1),
        missing_means: "MMU generations are unknown",
        set: |o, v| o.kvm_mmu_valid_gen = v,
    },
    FieldSpec {
        name: "kvm.userspace_pid",
        strukt: "kvm",
        path: "userspace_pid",
        shape: Shape::Int(4),
        missing_means: "the VMM pid of a VM is unknown",
        set: |o, v| o.kvm_userspace_pid = v,
    },
    FieldSpec {
        name: "kvm.memslots[0]",
        strukt: "kvm",
        path: "memslots",
        shape: Shape::PtrArray,
        missing_means: "memslot generations are unknown",
        set: |o, v| o.kvm_memslots0 = v,
    },
    FieldSpec {
        name: "kvm_memslots.generation",
        strukt: "kvm_memslots",
        path: "generation",
        shape: Shape::Int(8),
        missing_means: "memslot generations are unknown",
        set: |o, v| o.memslots_generation = v,
    },
    FieldSpec {
        name: "pt_regs.orig_ax",
        strukt: "pt_regs",
        path: "orig_ax",
        shape: Shape::Int(8),
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.regs_orig_ax = v,
    },
    FieldSpec {
        name: "pt_regs.di",
        strukt: "pt_regs",
        path: "di",
        shape: Shape::Int(8),
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.regs_di = v,
    },
    FieldSpec {
        name: "pt_regs.si",
        strukt: "pt_regs",
        path: "si",
        shape: Shape::Int(8),
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.regs_si = v,
    },
    FieldSpec {
        name: "task_struct.files",
        strukt: "task_struct",
        path: "files",
        shape: Shape::Ptr,
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.task_files = v,
    },
    FieldSpec {
        name: "files_struct.fdt",
        strukt: "files_struct",
        path: "fdt",
        shape: Shape::Ptr,
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.files_fdt = v,
    },
    FieldSpec {
        name: "fdtable.max_fds",
        strukt: "fdtable",
        path: "max_fds",
        shape: Shape::Int(4),
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.fdtable_max_fds = v,
    },
    FieldSpec {
        name: "fdtable.fd",
        strukt: "fdtable",
        path: "fd",
        shape: Shape::Ptr,
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.fdtable_fd = v,
    },
    FieldSpec {
        name: "file.private_data",
        strukt: "file",
        path: "private_data",
        shape: Shape::Ptr,
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.file_private_data = v,
    },
    FieldSpec {
        name: "file.f_path.dentry",
        strukt: "file",
        path: "f_path.dentry",
        shape: Shape::Ptr,
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.file_dentry = v,
    },
    FieldSpec {
        name: "dentry.d_name.name",
        strukt: "dentry",
        path: "d_name.name",
        shape: Shape::Ptr,
        missing_means: "the KVM_RUN sampler is off",
        set: |o, v| o.dentry_name = v,
    },
    FieldSpec {
        name: "page.private",
        strukt: "page",
        path: "private",
        shape: Shape::Int(8),
        missing_means: "stale mirror roots can't be seen in the kernel",
        set: |o, v| o.page_private = v,
    },
    FieldSpec {
        name: "kvm_mmu_page.role",
        strukt: "kvm_mmu_page",
        path: "role",
        shape: Shape::Word4,
        missing_means: "stale mirror roots can't be seen in the kernel",
        set: |o, v| o.mmu_page_role = v,
    },
];

/// Sizes and bit positions the probes need besides offsets, reported as
/// fields: `sizeof(struct page)` and the bit of `kvm_mmu_page_role.invalid`.
pub const PAGE_SIZE_FIELD: &str = "page (sizeof)";
pub const ROLE_INVALID_FIELD: &str = "kvm_mmu_page_role.invalid (bit)";

/// Fields the `KVM_RUN` sampler needs, besides the vCPU's own.
pub const RUN_SAMPLER_FIELDS: &[&str] = &[
    "pt_regs.orig_ax",
    "pt_regs.di",
    "pt_regs.si",
    "task_struct.files",
    "files_struct.fdt",
    "fdtable.max_fds",
    "fdtable.fd",
    "file.private_data",
    "file.f_path.dentry",
    "dentry.d_name.name",
];

/// One resolved (or absent) field, as `doctor` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FieldOffset {
    pub name: &'static str,
    /// Byte offset from the start of the struct; `None` when absent.
    pub offset: Option<u32>,
    /// Why it is absent, and what that switches off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub absent: Option<String>,
}

/// Offsets for the programs, and the per-field report.
#[derive(Clone, Debug)]
pub struct ResolvedOffsets {
    pub offsets: KernelOffsets,
    pub fields: Vec<FieldOffset>,
}

impl ResolvedOffsets {
    pub fn get(&self, name: &str) -> Option<u32> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .and_then(|f| f.offset)
    }
}

/// Resolves every field the probes read.
pub fn resolve_offsets(btf: &Btf) -> ResolvedOffsets {
    let mut offsets = KernelOffsets::ABSENT;
    let mut fields = Vec::with_capacity(FIELDS.len());
    for spec in FIELDS {
        match field_offset(btf, spec.strukt, spec.path, spec.shape) {
            Ok(off) => {
                (spec.set)(&mut offsets, off);
                fields.push(FieldOffset {
                    name: spec.name,
                    offset: Some(off),
                    absent: None,
                });
            }
            Err(why) => {
                (spec.set)(&mut offsets, OFFSET_ABSENT);
                fields.push(FieldOffset {
                    name: spec.name,
                    offset: None,
                    absent: Some(format!("{why}; {}", spec.missing_means)),
                });
            }
        }
    }
    let page_size = find_struct(btf, "page")
        .map(|s| s.size())
        .ok_or_else(|| "no struct page in BTF".to_owned());
    let invalid_bit = member_bit(btf, "kvm_mmu_page_role", "invalid");
    for (name, r, set) in [
        (
            PAGE_SIZE_FIELD,
            page_size,
            (|o, v| o.page_size = v) as fn(&mut KernelOffsets, u32),
        ),
        (ROLE_INVALID_FIELD, invalid_bit, |o, v| {
            o.role_invalid_bit = v;
        }),
    ] {
        match r {
            Ok(v) => {
                set(&mut offsets, v);
                fields.push(FieldOffset {
                    name,
                    offset: Some(v),
                    absent: None,
                });
            }
            Err(why) => fields.push(FieldOffset {
                name,
                offset: None,
                absent: Some(format!(
                    "{why}; stale mirror roots can't be seen in the kernel"
                )),
            }),
        }
    }
    ResolvedOffsets { offsets, fields }
}

/// The bit position of member `name` (a bitfield) in union or struct
/// `outer`.
fn member_bit(btf: &Btf, outer: &str, name: &str) -> Result<u32, String> {
    let s = btf
        .by_name(outer, &[kind::STRUCT, kind::UNION])
        .find(|t| t.vlen() > 0)
        .ok_or_else(|| format!("no union {outer} in BTF"))?;
    find_member(btf, &s, name)
        .map(|(bits, _)| bits)
        .ok_or_else(|| format!("union {outer} has no member {name}"))
}

/// Whether BTF has a complete definition of `struct name`.
pub fn has_struct(btf: &Btf, name: &str) -> bool {
    find_struct(btf, name).is_some()
}

/// Number of parameters of the function `name`, from its BTF prototype.
pub fn func_param_count(btf: &Btf, name: &str) -> Option<usize> {
    btf.by_name(name, &[kind::FUNC]).find_map(|f| {
        let proto = btf.get(f.target())?;
        (proto.kind == kind::FUNC_PROTO).then(|| proto.vlen())
    })
}

fn find_struct<'a>(btf: &'a Btf, name: &'a str) -> Option<Type<'a>> {
    btf.by_name(name, &[kind::STRUCT]).find(|t| t.vlen() > 0)
}

/// Strips typedefs and qualifiers.
fn strip<'a>(btf: &'a Btf, mut t: Type<'a>) -> Result<Type<'a>, String> {
    for _ in 0..32 {
        match t.kind {
            kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                t = btf
                    .get(t.target())
                    .ok_or_else(|| format!("broken BTF type chain at type {}", t.id))?;
            }
            _ => return Ok(t),
        }
    }
    Err("BTF typedef chain too deep".into())
}

/// Finds `name` among the members of `s`, looking through anonymous
/// structs and unions. Returns the bit offset and the member's type.
fn find_member<'a>(btf: &'a Btf, s: &Type<'a>, name: &str) -> Option<(u32, Type<'a>)> {
    for m in btf.members(s) {
        let mtype = btf.get(m.type_id)?;
        if m.name == name.as_bytes() {
            return Some((m.bit_offset, mtype));
        }
        if m.name.is_empty()
            && let Ok(inner) = strip(btf, mtype)
            && matches!(inner.kind, kind::STRUCT | kind::UNION)
            && let Some((off, t)) = find_member(btf, &inner, name)
        {
            return Some((m.bit_offset + off, t));
        }
    }
    None
}

fn field_offset(btf: &Btf, strukt: &str, path: &str, shape: Shape) -> Result<u32, String> {
    let mut cur = find_struct(btf, strukt).ok_or_else(|| format!("no struct {strukt} in BTF"))?;
    let mut bits = 0u32;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (off, t) = find_member(btf, &cur, part)
            .ok_or_else(|| format!("struct {strukt} has no member {}", parts[..=i].join(".")))?;
        bits += off;
        let t = strip(btf, t)?;
        if i + 1 < parts.len() {
            if matches!(t.kind, kind::STRUCT | kind::UNION) {
                cur = t;
            } else {
                return Err(format!(
                    "{strukt}.{} is a {}, not a struct",
                    parts[..=i].join("."),
                    kind_name(t.kind)
                ));
            }
        } else {
            check_shape(btf, &t, shape).map_err(|e| format!("{strukt}.{path}: {e}"))?;
        }
    }
    if !bits.is_multiple_of(8) {
        return Err(format!("{strukt}.{path} is a bitfield"));
    }
    Ok(bits / 8)
}

fn check_shape(btf: &Btf, t: &Type<'_>, shape: Shape) -> Result<(), String> {
    let size = t.size() as usize;
    let ok = match (shape, t.kind) {
        (Shape::Ptr, kind::PTR) | (Shape::Struct, kind::STRUCT) => true,
        (Shape::Int(n), kind::INT | kind::ENUM) => size == n,
        (Shape::Word4, kind::INT | kind::UNION | kind::STRUCT) => size == 4,
        (Shape::PtrArray, kind::ARRAY) => {
            let elem = t
                .array_elem()
                .and_then(|id| btf.get(id))
                .ok_or("array element: no such type")?;
            strip(btf, elem)?.kind == kind::PTR
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unexpected type {} (expected {shape:?})",
            describe(t)
        ))
    }
}

/// The kind's name, as btf_rs and bpftool spell it.
fn kind_name(k: u8) -> &'static str {
    match k {
        kind::INT => "int",
        kind::PTR => "ptr",
        kind::ARRAY => "array",
        kind::STRUCT => "struct",
        kind::UNION => "union",
        kind::ENUM => "enum",
        kind::FWD => "fwd",
        kind::TYPEDEF => "typedef",
        kind::VOLATILE => "volatile",
        kind::CONST => "const",
        kind::RESTRICT => "restrict",
        kind::FUNC => "func",
        kind::FUNC_PROTO => "func-proto",
        kind::VAR => "var",
        kind::DATASEC => "datasec",
        kind::FLOAT => "float",
        kind::DECL_TAG => "decl-tag",
        kind::TYPE_TAG => "type-tag",
        kind::ENUM64 => "enum64",
        _ => "unknown",
    }
}

fn describe(t: &Type<'_>) -> String {
    match t.kind {
        kind::INT => format!("int of {} bytes", t.size()),
        kind::STRUCT | kind::UNION => format!("{} of {} bytes", kind_name(t.kind), t.size()),
        k => kind_name(k).to_owned(),
    }
}
