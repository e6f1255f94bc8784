//! What `tracer top` shows, built from events: per-VM and per-vCPU rows,
//! rates, the latest findings, and the view's own state (selection, sort,
//! filter). Pure: no terminal, no clock; event timestamps and the `now_ns`
//! given to [`TopState::tick`] are its clock, so live and replayed runs and
//! the tests share it.

use std::collections::{BTreeMap, VecDeque};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use common::{INVALID_PAGE, KVM_X86_TDX_VM};

use crate::{
    detector::{Detector, DetectorConfig, Finding, FindingKind, Severity},
    event::{Event, Kind, vm_type_name},
};

/// Findings kept for the findings pane.
const FINDINGS_KEPT: usize = 200;
/// VMs kept; beyond it the least recently seen goes (teardown is not seen
/// on kernels without kprobes).
const MAX_VMS: usize = 4096;

/// One vCPU's row.
#[derive(Clone, Debug, Default)]
pub struct VcpuRow {
    pub vcpu: u64,
    pub vcpu_id: Option<i32>,
    pub root_hpa: Option<u64>,
    pub mirror_root_hpa: Option<u64>,
    /// (timestamp, return code) of the last `kvm_mmu_load()`.
    pub last_load: Option<(u64, i64)>,
    pub mmu_valid_gen: Option<u8>,
    pub last_seen_ns: u64,
}

/// One VM's row.
#[derive(Clone, Debug, Default)]
pub struct VmRow {
    pub kvm: u64,
    pub userspace_pid: Option<i32>,
    pub vm_type: Option<u8>,
    pub mmu_valid_gen: Option<u8>,
    pub vcpus: BTreeMap<u64, VcpuRow>,
    pub loads: u64,
    pub zaps: u64,
    pub findings: u64,
    pub loads_per_s: f64,
    pub zaps_per_s: f64,
    loads_at_tick: u64,
    zaps_at_tick: u64,
    pub last_seen_ns: u64,
}

impl VmRow {
    pub fn is_tdx(&self) -> bool {
        self.vm_type == Some(KVM_X86_TDX_VM)
    }

    pub fn type_name(&self) -> &'static str {
        self.vm_type.map_or("?", vm_type_name)
    }
}

/// The VM table's sort columns, in the order `s` cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Findings,
    ZapsPerS,
    LoadsPerS,
    Vcpus,
    Pid,
    Type,
}

impl SortKey {
    const ORDER: [Self; 6] = [
        Self::Findings,
        Self::ZapsPerS,
        Self::LoadsPerS,
        Self::Vcpus,
        Self::Pid,
        Self::Type,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Findings => "findings",
            Self::ZapsPerS => "zaps/s",
            Self::LoadsPerS => "loads/s",
            Self::Vcpus => "vcpus",
            Self::Pid => "pid",
            Self::Type => "type",
        }
    }

    fn next(self) -> Self {
        let i = Self::ORDER.iter().position(|k| *k == self).unwrap_or(0);
        Self::ORDER[(i + 1) % Self::ORDER.len()]
    }
}

/// What a key asks of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    TogglePause,
    Faster,
    Slower,
}

/// Everything on screen.
pub struct TopState {
    /// Header facts: host, kernel, where events come from, the plan.
    pub host: String,
    pub kernel: String,
    pub source: String,
    pub plan_summary: String,
    pub vms: BTreeMap<u64, VmRow>,
    /// VMMs' names: read from `/proc` live, from `vm` records in a replay.
    pub names: crate::vmid::VmNames,
    /// Newest first.
    pub findings: VecDeque<Finding>,
    pub events: u64,
    pub findings_total: u64,
    pub critical_total: u64,
    /// Findings by kind since the start.
    pub by_kind: BTreeMap<FindingKind, u64>,
    /// Events lost (ring buffer full, or recorded as lost in a log).
    pub drops: u64,
    pub events_per_s: f64,
    events_at_tick: u64,
    last_tick_ns: Option<u64>,
    /// The newest event time seen.
    pub now_ns: u64,
    pub sort: SortKey,
    /// Ascending instead of descending.
    pub reverse: bool,
    pub filter: String,
    /// `/` was pressed: keys go to the filter.
    pub editing_filter: bool,
    /// The selected VM, by `struct kvm *`.
    pub selected: Option<u64>,
    /// Replay: paused, speed, and a status such as "end of log".
    pub paused: bool,
    pub speed: Option<f64>,
    pub status: String,
    detector: Detector,
    scratch: Vec<Finding>,
}

impl TopState {
    pub fn new(host: String, kernel: String, source: String, plan_summary: String) -> Self {
        Self {
            host,
            kernel,
            source,
            plan_summary,
            vms: BTreeMap::new(),
            findings: VecDeque::new(),
            events: 0,
            findings_total: 0,
            critical_total: 0,
            by_kind: BTreeMap::new(),
            drops: 0,
            events_per_s: 0.0,
            events_at_tick: 0,
            last_tick_ns: None,
            now_ns: 0,
            sort: SortKey::Findings,
            reverse: false,
            filter: String::new(),
            editing_filter: false,
            selected: None,
            paused: false,
            speed: None,
            status: String::new(),
            detector: Detector::new(DetectorConfig::default()),
            scratch: Vec::new(),
            names: crate::vmid::VmNames::default(),
        }
    }

    /// The VM's name (QEMU `-name`, libvirt domain or uuid), when known.
    pub fn vm_name(&self, vm: &VmRow) -> Option<&str> {
        self.names.get(vm.userspace_pid)?.display_name()
    }

    /// Takes one event: rows, counters, and the detector's findings.
    pub fn event(&mut self, ev: &Event) {
        self.events += 1;
        self.now_ns = self.now_ns.max(ev.ts_ns);
        if let Some(pid) = ev.userspace_pid {
            self.names.observe(pid, ev.ts_ns);
        }
        self.detector.observe(ev, &mut self.scratch);
        for mut f in std::mem::take(&mut self.scratch) {
            f.vm = self.names.get(f.userspace_pid).cloned();
            self.finding(f);
        }
        let Some(kvm) = ev.kvm else {
            return;
        };
        if ev.kind == Kind::VmDestroy {
            self.vms.remove(&kvm);
            return;
        }
        // A late event of a VM already torn down (or a root invalidation of
        // one never seen alive): the detector ignored it, so does the view.
        if !self.detector.knows_vm(kvm) {
            self.vms.remove(&kvm);
            return;
        }
        if !self.vms.contains_key(&kvm) && self.vms.len() >= MAX_VMS {
            let oldest = self
                .vms
                .values()
                .min_by_key(|v| v.last_seen_ns)
                .map(|v| v.kvm);
            if let Some(k) = oldest {
                self.vms.remove(&k);
            }
        }
        let vm = self.vms.entry(kvm).or_insert_with(|| VmRow {
            kvm,
            ..VmRow::default()
        });
        vm.last_seen_ns = ev.ts_ns;
        if ev.userspace_pid.is_some() {
            vm.userspace_pid = ev.userspace_pid;
        }
        if ev.vm_type.is_some() {
            vm.vm_type = ev.vm_type;
        }
        match ev.kind {
            Kind::ZapAllFast => {
                vm.zaps += 1;
                vm.mmu_valid_gen = ev.mmu_valid_gen;
            }
            Kind::LoadReturn => vm.loads += 1,
            _ => {}
        }
        let Some(vcpu) = ev.vcpu else {
            return;
        };
        if ev.kind == Kind::VcpuDestroy {
            vm.vcpus.remove(&vcpu);
            return;
        }
        let row = vm.vcpus.entry(vcpu).or_insert_with(|| VcpuRow {
            vcpu,
            ..VcpuRow::default()
        });
        row.last_seen_ns = ev.ts_ns;
        if ev.vcpu_id.is_some() {
            row.vcpu_id = ev.vcpu_id;
        }
        if ev.root_hpa.is_some() {
            row.root_hpa = ev.root_hpa;
        }
        if ev.mirror_root_hpa.is_some() {
            row.mirror_root_hpa = ev.mirror_root_hpa;
        }
        if ev.mmu_valid_gen.is_some() {
            row.mmu_valid_gen = ev.mmu_valid_gen;
        }
        if ev.kind == Kind::LoadReturn {
            row.last_load = Some((ev.ts_ns, ev.ret.unwrap_or(0)));
        }
    }

    fn finding(&mut self, f: Finding) {
        self.findings_total += 1;
        *self.by_kind.entry(f.kind).or_default() += 1;
        if f.severity == Severity::Critical {
            self.critical_total += 1;
        }
        if let Some(vm) = self.vms.get_mut(&f.kvm) {
            vm.findings += 1;
        } else {
            self.vms.insert(
                f.kvm,
                VmRow {
                    kvm: f.kvm,
                    userspace_pid: f.userspace_pid,
                    findings: 1,
                    last_seen_ns: f.ts_ns,
                    ..VmRow::default()
                },
            );
        }
        self.findings.push_front(f);
        self.findings.truncate(FINDINGS_KEPT);
    }

    /// Recomputes the rates over the time since the last tick.
    #[expect(clippy::cast_precision_loss, reason = "rates for display")]
    pub fn tick(&mut self, now_ns: u64) {
        if let Some(last) = self.last_tick_ns {
            if now_ns <= last {
                return;
            }
            let secs = (now_ns - last) as f64 / 1e9;
            self.events_per_s = (self.events - self.events_at_tick) as f64 / secs;
            for vm in self.vms.values_mut() {
                vm.loads_per_s = (vm.loads - vm.loads_at_tick.min(vm.loads)) as f64 / secs;
                vm.zaps_per_s = (vm.zaps - vm.zaps_at_tick.min(vm.zaps)) as f64 / secs;
            }
        }
        self.last_tick_ns = Some(now_ns);
        self.events_at_tick = self.events;
        for vm in self.vms.values_mut() {
            vm.loads_at_tick = vm.loads;
            vm.zaps_at_tick = vm.zaps;
        }
    }

    /// The VMs the table shows: filtered, then sorted.
    pub fn visible(&self) -> Vec<&VmRow> {
        let needle = self.filter.to_lowercase();
        let mut rows: Vec<&VmRow> = self
            .vms
            .values()
            .filter(|vm| {
                needle.is_empty()
                    || vm
                        .userspace_pid
                        .is_some_and(|p| p.to_string().contains(&needle))
                    || vm.type_name().contains(&needle)
                    || format!("{:#x}", vm.kvm).contains(&needle)
            })
            .collect();
        let key = self.sort;
        rows.sort_by(|a, b| {
            let ord = match key {
                SortKey::Findings => a.findings.cmp(&b.findings),
                SortKey::ZapsPerS => a.zaps_per_s.total_cmp(&b.zaps_per_s),
                SortKey::LoadsPerS => a.loads_per_s.total_cmp(&b.loads_per_s),
                SortKey::Vcpus => a.vcpus.len().cmp(&b.vcpus.len()),
                SortKey::Pid => a.userspace_pid.cmp(&b.userspace_pid),
                SortKey::Type => a.vm_type.cmp(&b.vm_type),
            }
            .then(a.userspace_pid.cmp(&b.userspace_pid))
            .then(a.kvm.cmp(&b.kvm));
            // Descending by default, as in top; `r` flips it.
            if self.reverse { ord } else { ord.reverse() }
        });
        rows
    }

    /// The selected VM among the visible ones (the first if none is).
    pub fn selected_index(&self, visible: &[&VmRow]) -> Option<usize> {
        if visible.is_empty() {
            return None;
        }
        Some(
            self.selected
                .and_then(|k| visible.iter().position(|v| v.kvm == k))
                .unwrap_or(0),
        )
    }

    fn move_selection(&mut self, delta: isize) {
        let visible = self.visible();
        let Some(i) = self.selected_index(&visible) else {
            return;
        };
        let last = visible.len() - 1;
        let j = i.saturating_add_signed(delta).min(last);
        self.selected = Some(visible[j].kvm);
    }

    /// Handles one key press.
    pub fn key(&mut self, k: KeyEvent) -> Action {
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.editing_filter {
            match k.code {
                KeyCode::Enter => self.editing_filter = false,
                KeyCode::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if self.filter.len() < 32 => self.filter.push(c),
                _ => {}
            }
            return Action::None;
        }
        match k.code {
            KeyCode::Esc if !self.filter.is_empty() => self.filter.clear(),
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-10),
            KeyCode::PageDown => self.move_selection(10),
            KeyCode::Home => self.move_selection(isize::MIN / 2),
            KeyCode::End => self.move_selection(isize::MAX / 2),
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('r') => self.reverse = !self.reverse,
            KeyCode::Char('/') => self.editing_filter = true,
            KeyCode::Char(' ') => return Action::TogglePause,
            KeyCode::Char('+' | '=') => return Action::Faster,
            KeyCode::Char('-') => return Action::Slower,
            _ => {}
        }
        Action::None
    }
}

/// A root as the vCPU pane shows it.
pub fn root_text(hpa: Option<u64>) -> String {
    match hpa {
        None => "-".into(),
        Some(INVALID_PAGE) => "INVALID".into(),
        Some(h) => format!("valid {h:#x}"),
    }
}
