"""The DaemonSet's pod run on containerd's CRI the way a kubelet runs it (tests/tests/deploy_cri.rs).

It reads the manifests as rendered (`kubectl kustomize deploy/kubernetes`, and the example
workload pod), builds from the pod templates the CRI requests a kubelet builds (RunPodSandbox,
CreateContainer, StartContainer, StopContainer: namespaces, hostPath / emptyDir / ConfigMap /
Secret mounts, security context, seccomp, capabilities, resources), sends them over
containerd's gRPC socket, runs the pod's probes against the pod's address as the kubelet's
prober does, restarts an exited container (the next attempt in the same sandbox), rolls the
DaemonSet as its controller does with maxSurge (a second pod of the template beside the
first, the old one deleted once the new one is ready), and prints one verdict line per
check (`cri: <check>: PASS (...)` or `FAIL: ...`).

The CRI messages come from the runtime itself: containerd embeds the descriptor of the
`runtime.v1` api.proto it serves (gzipped, as generated Go code registers it); it is read
out of the binary, so no proto file is vendored and none can drift from the runtime.

Deviations from a node, each on purpose: hostPath directories live under --node-root (a
test must not take the machine's /run/varta); the Secret the README creates by hand is
generated here; no API server (no service environment variables, no status written back).
"""

import argparse
import json
import os
import re
import socket
import sys
import time
import uuid
import zlib

import grpc
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# What a kubelet adds (pkg/kubelet/kuberuntime): the default masked and read-only /proc paths.
MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware",
]
READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]
CRITICAL_PRIORITY_CLASSES = {"system-node-critical", "system-cluster-critical"}


def cri_api(containerd_binary):
    """runtime.v1's messages, from the descriptor containerd registers."""
    data = open(containerd_binary, "rb").read()
    for m in re.finditer(rb"\x1f\x8b\x08\x00\x00\x00\x00\x00", data):
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[m.start():m.start() + (1 << 20)])
            fd = descriptor_pb2.FileDescriptorProto()
            fd.ParseFromString(raw)
        except Exception:
            continue
        if fd.package == "runtime.v1" and any(s.name == "RuntimeService" for s in fd.service):
            # gogo.proto only adds options; the types need nothing from it.
            del fd.dependency[:]
            pool = descriptor_pool.DescriptorPool()
            pool.Add(fd)
            return pool
    sys.exit(f"no runtime.v1 CRI descriptor in {containerd_binary}")


class Cri:
    def __init__(self, sock, pool):
        self.pool = pool
        self.channel = grpc.insecure_channel(f"unix://{sock}")

    def msg(self, _type, **kw):
        cls = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(f"runtime.v1.{_type}"))
        return cls(**kw)

    def call(self, service, method, request, timeout=60):
        desc = self.pool.FindServiceByName(f"runtime.v1.{service}").methods_by_name[method]
        resp_cls = message_factory.GetMessageClass(desc.output_type)
        stub = self.channel.unary_unary(
            f"/runtime.v1.{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        return stub(request, timeout=timeout)

    def rt(self, method, request, timeout=60):
        return self.call("RuntimeService", method, request, timeout)

    def img(self, method, request):
        return self.call("ImageService", method, request)


def quantity(q, unit):
    """A Kubernetes quantity: CPU in millicores (unit='m') or memory in bytes (unit='b')."""
    q = str(q)
    if unit == "m":
        return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)
    for suffix, mult in (("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 1000), ("M", 10**6), ("G", 10**9)):
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * mult)
    return int(q)


def qos(spec):
    """The pod's QoS class, as the kubelet decides it (cgroup parent kubepods/<qos>)."""
    guaranteed, any_set = True, False
    for c in spec["containers"]:
        r = c.get("resources", {})
        req, lim = r.get("requests", {}), r.get("limits", {})
        any_set |= bool(req or lim)
        for k in ("cpu", "memory"):
            if k not in lim or (k in req and quantity(req[k], "m" if k == "cpu" else "b") != quantity(lim[k], "m" if k == "cpu" else "b")):
                guaranteed = False
    if not any_set:
        return "besteffort"
    return "guaranteed" if guaranteed else "burstable"


def node_memory():
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 1 << 30


def oom_score_adj(pod_spec, container, pod_qos):
    """pkg/kubelet/qos/policy.go: critical pods -997, guaranteed -997, best effort 1000,
    burstable 1000 - 1000 * memory request / node memory, within [2, 999]."""
    if pod_spec.get("priorityClassName") in CRITICAL_PRIORITY_CLASSES or pod_qos == "guaranteed":
        return -997
    if pod_qos == "besteffort":
        return 1000
    req = quantity(container.get("resources", {}).get("requests", {}).get("memory", "0"), "b")
    adj = 1000 - (1000 * req) // node_memory()
    return min(max(adj, 2), 999)


class Kubelet:
    """Just enough of a kubelet to run one pod from its spec, on a node rooted at node_root."""

    def __init__(self, cri, node_root, secrets):
        self.cri = cri
        self.node_root = node_root
        self.secrets = secrets
        self.configmaps = {}

    def host(self, path):
        """A hostPath of the pod spec, on this test's node."""
        return os.path.join(self.node_root, path.lstrip("/"))

    def run_pod(self, pod, namespace):
        meta, spec = pod["metadata"], pod["spec"]
        uid = str(uuid.uuid4())
        name = meta["name"]
        pod_dir = os.path.join(self.node_root, "var/lib/kubelet/pods", uid)
        os.makedirs(pod_dir)
        log_dir = os.path.join(self.node_root, "var/log/pods", f"{namespace}_{name}_{uid}")
        os.makedirs(log_dir)
        pod_qos = qos(spec)
        host_pid = spec.get("hostPID", False)
        host_net = spec.get("hostNetwork", False)
        NODE, POD, CONTAINER = 2, 0, 1
        pid_mode = NODE if host_pid else POD if spec.get("shareProcessNamespace") else CONTAINER
        ns_opts = dict(network=NODE if host_net else POD, pid=pid_mode, ipc=NODE if spec.get("hostIPC") else POD)
        labels = dict(meta.get("labels", {}))
        labels.update({"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.uid": uid})
        ports = [
            self.cri.msg("PortMapping", protocol=0 if p.get("protocol", "TCP") == "TCP" else 1, container_port=p["containerPort"], host_port=p.get("hostPort", 0))
            for c in spec["containers"] for p in c.get("ports", [])
        ]
        psc = spec.get("securityContext", {})
        sandbox_sc = self.cri.msg(
            "LinuxSandboxSecurityContext",
            namespace_options=self.cri.msg("NamespaceOption", **ns_opts),
        )
        if "runAsUser" in psc:
            sandbox_sc.run_as_user.value = psc["runAsUser"]
        config = self.cri.msg(
            "PodSandboxConfig",
            metadata=self.cri.msg("PodSandboxMetadata", name=name, uid=uid, namespace=namespace, attempt=0),
            hostname="" if host_net else name,
            log_directory=log_dir,
            port_mappings=ports,
            labels=labels,
            annotations=meta.get("annotations", {}),
            linux=self.cri.msg(
                "LinuxPodSandboxConfig",
                # cgroupfs driver: /kubepods/<qos>/pod<uid> (guaranteed pods directly under kubepods)
                cgroup_parent=f"/kubepods/pod{uid}" if pod_qos == "guaranteed" else f"/kubepods/{pod_qos}/pod{uid}",
                security_context=sandbox_sc,
                # As the kubelet passes them (once its allow-list admits them): set by the
                # runtime in the sandbox's namespaces.
                sysctls={s["name"]: str(s["value"]) for s in psc.get("sysctls", [])},
            ),
        )
        sandbox = self.cri.rt("RunPodSandbox", self.cri.msg("RunPodSandboxRequest", config=config)).pod_sandbox_id
        status = self.cri.rt("PodSandboxStatus", self.cri.msg("PodSandboxStatusRequest", pod_sandbox_id=sandbox)).status
        ip = status.network.ip
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        containers = {}
        for c in spec["containers"]:
            cid = self.create_container(pod, namespace, uid, pod_dir, sandbox, config, c, volumes, ns_opts, pod_qos, 0)
            self.cri.rt("StartContainer", self.cri.msg("StartContainerRequest", container_id=cid))
            containers[c["name"]] = cid
        created = (namespace, pod_dir, config, volumes, ns_opts, pod_qos)
        return Pod(self, pod, uid, sandbox, ip, containers, log_dir, created)

    def volume_path(self, pod_dir, volume, sub_path):
        """The host path a volume (and subPath) resolves to, materialised as a kubelet does."""
        if "hostPath" in volume:
            hp = volume["hostPath"]
            path = self.host(hp["path"])
            kind = hp.get("type", "")
            if kind == "DirectoryOrCreate":
                os.makedirs(path, mode=0o755, exist_ok=True)
            elif kind == "Directory" and not os.path.isdir(path):
                raise RuntimeError(f"hostPath {hp['path']} is not a directory (type: Directory)")
        elif "emptyDir" in volume:
            # The kubelet's empty-dir plugin: a directory of the pod's, kept across its
            # containers' restarts, removed with the pod.
            path = os.path.join(pod_dir, "volumes", "kubernetes.io~empty-dir", volume["name"])
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o777)
        elif "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            src = volume[kind]
            data = self.configmaps[src["name"]] if kind == "configMap" else self.secrets[src["secretName"]]
            mode = src.get("defaultMode", 0o644)
            # The atomic writer's layout: files in a timestamped directory, ..data -> it, and
            # a symlink per key; a subPath mount gets the resolved file.
            base = os.path.join(pod_dir, "volumes", f"kubernetes.io~{kind.lower()}", volume["name"])
            stamp = os.path.join(base, "..2026_01_01_00_00_00.000000000")
            os.makedirs(stamp, exist_ok=True)
            for key, value in data.items():
                p = os.path.join(stamp, key)
                with open(p, "w") as f:
                    f.write(value)
                os.chmod(p, mode)
                if not os.path.lexists(os.path.join(base, key)):
                    os.symlink(os.path.join("..data", key), os.path.join(base, key))
            if not os.path.lexists(os.path.join(base, "..data")):
                os.symlink(os.path.basename(stamp), os.path.join(base, "..data"))
            path = base
        else:
            raise RuntimeError(f"volume kind not handled: {volume}")
        if sub_path:
            path = os.path.realpath(os.path.join(path, sub_path))
        return path

    def create_container(self, pod, namespace, uid, pod_dir, sandbox, sandbox_config, c, volumes, ns_opts, pod_qos, attempt):
        spec = pod["spec"]
        image_ref = self.cri.img("ImageStatus", self.cri.msg("ImageStatusRequest", image=self.cri.msg("ImageSpec", image=c["image"]))).image.id
        if not image_ref:
            raise RuntimeError(f"image {c['image']} is not present (imagePullPolicy {c.get('imagePullPolicy')}: nothing to pull from here)")
        mounts = []
        for vm in c.get("volumeMounts", []):
            mounts.append(self.cri.msg(
                "Mount",
                container_path=vm["mountPath"],
                host_path=self.volume_path(pod_dir, volumes[vm["name"]], vm.get("subPath")),
                readonly=vm.get("readOnly", False),
            ))
        # The kubelet-managed /etc/hosts (pods on the pod network) and the termination log.
        if not spec.get("hostNetwork"):
            hosts = os.path.join(pod_dir, "etc-hosts")
            with open(hosts, "w") as f:
                f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
            mounts.append(self.cri.msg("Mount", container_path="/etc/hosts", host_path=hosts))
        term = os.path.join(pod_dir, "containers", c["name"], uuid.uuid4().hex[:8])
        os.makedirs(os.path.dirname(term), exist_ok=True)
        open(term, "w").close()
        mounts.append(self.cri.msg("Mount", container_path=c.get("terminationMessagePath", "/dev/termination-log"), host_path=term))

        sc = c.get("securityContext", {})
        psc = spec.get("securityContext", {})
        caps = sc.get("capabilities", {})
        lsc = self.cri.msg(
            "LinuxContainerSecurityContext",
            capabilities=self.cri.msg("Capability", add_capabilities=caps.get("add", []), drop_capabilities=caps.get("drop", [])),
            privileged=sc.get("privileged", False),
            namespace_options=self.cri.msg("NamespaceOption", **ns_opts),
            readonly_rootfs=sc.get("readOnlyRootFilesystem", False),
            no_new_privs=not sc.get("allowPrivilegeEscalation", True) and not sc.get("privileged", False),
            masked_paths=[] if sc.get("privileged") else MASKED_PATHS,
            readonly_paths=[] if sc.get("privileged") else READONLY_PATHS,
        )
        for key, field in (("runAsUser", "run_as_user"), ("runAsGroup", "run_as_group")):
            value = sc.get(key, psc.get(key))
            if value is not None:
                getattr(lsc, field).value = value
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile"))
        if seccomp:
            types = {"RuntimeDefault": 0, "Unconfined": 1, "Localhost": 2}
            lsc.seccomp.profile_type = types[seccomp["type"]]
            if seccomp["type"] == "Localhost":
                lsc.seccomp.localhost_ref = seccomp["localhostProfile"]
        res = c.get("resources", {})
        req, lim = res.get("requests", {}), res.get("limits", {})
        period = 100000
        cpu_req = quantity(req.get("cpu", lim.get("cpu", "0")), "m")
        resources = self.cri.msg(
            "LinuxContainerResources",
            cpu_period=period,
            cpu_quota=quantity(lim["cpu"], "m") * period // 1000 if "cpu" in lim else 0,
            cpu_shares=max(2, cpu_req * 1024 // 1000),
            memory_limit_in_bytes=quantity(lim["memory"], "b") if "memory" in lim else 0,
            oom_score_adj=oom_score_adj(spec, c, pod_qos),
        )
        annotations = {
            "io.kubernetes.container.restartCount": str(attempt),
            "io.kubernetes.container.terminationMessagePath": c.get("terminationMessagePath", "/dev/termination-log"),
            "io.kubernetes.container.terminationMessagePolicy": c.get("terminationMessagePolicy", "File"),
            "io.kubernetes.pod.terminationGracePeriod": str(spec.get("terminationGracePeriodSeconds", 30)),
        }
        if c.get("ports"):
            annotations["io.kubernetes.container.ports"] = json.dumps(c["ports"])
        config = self.cri.msg(
            "ContainerConfig",
            metadata=self.cri.msg("ContainerMetadata", name=c["name"], attempt=attempt),
            image=self.cri.msg("ImageSpec", image=image_ref),
            command=c.get("command", []),
            args=c.get("args", []),
            working_dir=c.get("workingDir", ""),
            envs=[self.cri.msg("KeyValue", key=e["name"], value=e.get("value", "")) for e in c.get("env", [])],
            mounts=mounts,
            labels={"io.kubernetes.container.name": c["name"], "io.kubernetes.pod.name": pod["metadata"]["name"],
                    "io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.uid": uid},
            annotations=annotations,
            log_path=os.path.join(c["name"], f"{attempt}.log"),
            linux=self.cri.msg("LinuxContainerConfig", resources=resources, security_context=lsc),
        )
        return self.cri.rt("CreateContainer", self.cri.msg(
            "CreateContainerRequest", pod_sandbox_id=sandbox, config=config, sandbox_config=sandbox_config)).container_id


class Pod:
    def __init__(self, kubelet, pod, uid, sandbox, ip, containers, log_dir, created):
        self.kubelet, self.pod, self.uid, self.sandbox, self.ip = kubelet, pod, uid, sandbox, ip
        self.containers, self.log_dir, self.created = containers, log_dir, created
        self.attempts = {name: 0 for name in containers}

    def restart(self, name):
        """As the kubelet restarts an exited container (restartPolicy Always): the next
        attempt, created and started in the same sandbox."""
        namespace, pod_dir, config, volumes, ns_opts, pod_qos = self.created
        self.attempts[name] += 1
        cid = self.kubelet.create_container(self.pod, namespace, self.uid, pod_dir, self.sandbox, config,
                                            self.container(name), volumes, ns_opts, pod_qos, self.attempts[name])
        self.kubelet.cri.rt("StartContainer", self.kubelet.cri.msg("StartContainerRequest", container_id=cid))
        self.containers[name] = cid

    def container(self, name):
        return next(c for c in self.pod["spec"]["containers"] if c["name"] == name)

    def logs(self, name, attempt=None):
        """The container's output, as `kubectl logs` shows it (CRI log lines: time stream tag
        text); the current attempt's unless one is named."""
        attempt = self.attempts[name] if attempt is None else attempt
        try:
            with open(os.path.join(self.log_dir, name, f"{attempt}.log")) as f:
                return [line.rstrip("\n").split(" ", 3)[-1] for line in f]
        except FileNotFoundError:
            return []

    def wait_log(self, name, parts, timeout):
        end = time.time() + timeout
        while time.time() < end:
            for line in self.logs(name):
                if all(p in line for p in parts):
                    return line
            time.sleep(0.1)
        return None

    def probe_until(self, name, kind, seconds):
        """Runs a probe until it passes (as the kubelet keeps probing), for at most `seconds`:
        whether it passed, and its last answer."""
        end, ok, answer = time.time() + seconds, False, ""
        while time.time() < end and not ok:
            ok, answer = self.probe(name, kind)
            if not ok:
                time.sleep(0.2)
        return ok, answer

    def probe(self, name, kind):
        """The kubelet's HTTP prober: GET http://<pod ip>:<port><path>, success for 200-399."""
        c = self.container(name)
        probe = c[kind]["httpGet"]
        port = probe["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c.get("ports", []) if p.get("name") == port)
        host = self.ip or "127.0.0.1"
        try:
            with socket.create_connection((host, port), timeout=c[kind].get("timeoutSeconds", 1)) as s:
                s.sendall(f"GET {probe['path']} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.30\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode())
                s.settimeout(c[kind].get("timeoutSeconds", 1))
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            code = int(data.split(b" ", 2)[1])
            body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
            return 200 <= code < 400, f"{code} {body}"
        except Exception as e:
            return False, str(e)

    def http(self, name, path, token):
        """GET PATH of the container's first port on the pod's address: (status, body)."""
        port = self.container(name)["ports"][0]["containerPort"]
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        try:
            with socket.create_connection((self.ip, port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\n{auth}\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except Exception as e:
            return 0, str(e)
        head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
        return int(head.split(" ", 2)[1]), body

    def metrics(self, name, token, *prefixes):
        """Lines of /metrics (with the Secret's token) starting with one of PREFIXES."""
        c = self.container(name)
        port = c["ports"][0]["containerPort"]
        try:
            with socket.create_connection((self.ip, port), timeout=2) as s:
                s.sendall(f"GET /metrics HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except Exception as e:
            return str(e)
        return "\n".join(l for l in data.decode(errors="replace").splitlines() if l.startswith(prefixes))

    def status(self, name):
        return self.kubelet.cri.rt("ContainerStatus", self.kubelet.cri.msg("ContainerStatusRequest", container_id=self.containers[name])).status

    def stop(self):
        """As the kubelet deletes the pod: StopContainer with the grace period, then the sandbox."""
        grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        took = {}
        for name, cid in self.containers.items():
            t = time.time()
            self.kubelet.cri.rt("StopContainer", self.kubelet.cri.msg("StopContainerRequest", container_id=cid, timeout=grace), timeout=grace + 30)
            took[name] = time.time() - t
        return grace, took

    def remove(self):
        cri = self.kubelet.cri
        for cid in self.containers.values():
            cri.rt("RemoveContainer", cri.msg("RemoveContainerRequest", container_id=cid))
        cri.rt("StopPodSandbox", cri.msg("StopPodSandboxRequest", pod_sandbox_id=self.sandbox))
        cri.rt("RemovePodSandbox", cri.msg("RemovePodSandboxRequest", pod_sandbox_id=self.sandbox))


class Verdicts:
    def __init__(self):
        self.failed = 0

    def check(self, name, ok, detail):
        if ok:
            print(f"cri: {name}: PASS ({detail})", flush=True)
        else:
            self.failed += 1
            print(f"cri: {name}: FAIL: {detail}", flush=True)
        return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--containerd", default="/usr/bin/containerd")
    ap.add_argument("--manifest", required=True, help="kubectl kustomize deploy/kubernetes")
    ap.add_argument("--workload", required=True, help="deploy/kubernetes/examples/workload-pod.yaml")
    ap.add_argument("--userspace-manifest", required=True, help="kubectl kustomize deploy/kubernetes-userspace")
    ap.add_argument("--node-root", required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args()

    docs = [d for d in yaml.safe_load_all(open(args.manifest)) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    workload = next(d for d in yaml.safe_load_all(open(args.workload)) if d and d["kind"] == "Pod")
    pool = cri_api(args.containerd)
    cri = Cri(args.socket, pool)
    version = cri.rt("Version", cri.msg("VersionRequest"))
    print(f"cri: runtime {version.runtime_name} {version.runtime_version} (CRI {version.runtime_api_version})", flush=True)
    token_secret = next(v["secret"]["secretName"] for v in ds["spec"]["template"]["spec"]["volumes"] if "secret" in v)
    kubelet = Kubelet(cri, args.node_root, {token_secret: {"token": args.token}})
    for d in docs:
        if d["kind"] == "ConfigMap":
            kubelet.configmaps[d["metadata"]["name"]] = d["data"]

    v = Verdicts()
    template = ds["spec"]["template"]
    ns = ds["metadata"]["namespace"]
    t0 = time.time()
    observer = kubelet.run_pod(daemonset_pod(ds, "x7k2p"), ns)
    name = template["spec"]["containers"][0]["name"]
    print(f"cri: observer pod {observer.uid} ip {observer.ip}, container {observer.containers[name][:12]} started in {time.time() - t0:.1f} s", flush=True)
    pods = [observer]
    try:
        ready = observer.wait_log(name, ["event=ready"], 60)
        v.check("the eBPF datapath attaches in the DaemonSet's pod", ready is not None and "datapath=ebpf" in ready,
                ready or "no event=ready line; the pod's log:\n" + "\n".join(observer.logs(name)))
        # Probes as the kubelet runs them: readiness until it passes, then liveness.
        ok, answer = observer.probe_until(name, "readinessProbe", 30)
        live, live_answer = observer.probe(name, "livenessProbe")
        rp, lp = (observer.container(name)[k]["httpGet"]["path"] for k in ("readinessProbe", "livenessProbe"))
        v.check("the readiness and liveness probes answer on the pod's address", ok and live,
                f"{observer.ip}: {rp} -> {answer}; {lp} -> {live_answer}")

        # What Prometheus sees: the Secret's token is required beyond loopback.
        anon = observer.http(name, "/metrics", None)
        authed = observer.http(name, "/metrics", args.token)
        info = [l for l in authed[1].splitlines() if l.startswith("varta_datapath_info")]
        v.check("/metrics needs the Secret's token on the pod's address", anon[0] == 401 and authed[0] == 200 and any('mode="ebpf"' in l for l in info),
                f"without token {anon[0]}, with it {authed[0]}: {info}")
        # The container as the runtime made it from the security context.
        opid = agent_pid(observer, name)
        status = proc_status(opid)
        want_caps = {"BPF": 39, "PERFMON": 38, "SYS_RESOURCE": 24, "NET_ADMIN": 12, "SYS_ADMIN": 21}
        added = observer.container(name)["securityContext"]["capabilities"]["add"]
        mask = f"{sum(1 << want_caps[c] for c in added):016x}"
        got = {k: status.get(k, "") for k in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp", "Uid")}
        root_ro = any(l.split()[4] == "/" and "ro" in l.split()[5].split(",") for l in open(f"/proc/{opid}/mountinfo"))
        v.check("the pod's security context is applied (capabilities, no new privileges, RuntimeDefault seccomp, read-only root)",
                got["CapEff"] == mask and got["CapBnd"] == mask and got["NoNewPrivs"] == "1" and got["Seccomp"] == "2" and root_ro
                and got["Uid"].split()[0] == "0",
                f"CapEff={got['CapEff']} CapBnd={got['CapBnd']} (want {mask}: {'+'.join(added)}) NoNewPrivs={got['NoNewPrivs']} "
                f"Seccomp={got['Seccomp']} root read-only={root_ro} uid={got['Uid'].split()[0]}")

        t1 = time.time()
        agent = kubelet.run_pod(workload, workload["metadata"].get("namespace", "default"))
        pods.append(agent)
        aname = workload["spec"]["containers"][0]["name"]
        acid = agent.containers[aname]
        line = observer.wait_log(name, ["event=agent_new", f"container_id={acid}"], 30)
        v.check("an agent in the example workload pod is tracked with its container id and pod uid",
                line is not None and f"pod_uid={agent.uid}" in line and "cross_namespace=true" in line,
                (line or "no event=agent_new for the agent's container") + f" (agent container {acid[:12]}, pod {agent.uid}, "
                f"started {time.time() - t1:.1f} s before)" + ("" if line else "\nagent log:\n" + "\n".join(agent.logs(aname)) + "\nobserver log:\n" + "\n".join(observer.logs(name))
                                                             + "\nobserver drops:\n" + observer.metrics(name, args.token, "varta_frames_dropped_total", "varta_decode_errors_total")))
        st = agent.status(aname)
        uid_line = next((l for l in open(f"/proc/{agent_pid(agent, aname)}/status") if l.startswith("Uid:")), "") if agent_pid(agent, aname) else ""
        v.check("the agent runs as the workload pod says", st.state == 1 and uid_line.split()[1:2] == ["65534"],
                f"state {st.state}, {uid_line.strip()}")
        # Still healthy with the agent beating.
        live, live_answer = observer.probe(name, "livenessProbe")
        v.check("liveness still answers while the agent beats", live, live_answer)
        apid = line.split(" pid=", 1)[1].split()[0] if line else "?"

        observer = rollout(v, kubelet, args, ds, observer, name, workload, aname, apid, pods)

        # The workload deleted as the kubelet does it: its silence is a stall naming it.
        agent.stop()
        agent.remove()
        pods.remove(agent)
        stall = observer.wait_log(name, ["event=stall", f" pid={apid} "], 30)
        v.check("the deleted workload's silence is one stall naming its container and pod",
                stall is not None and f"container_id={acid}" in stall and f"pod_uid={agent.uid}" in stall,
                stall or "no event=stall for the agent")

        grace, took = observer.stop()
        st = observer.status(name)
        v.check("SIGTERM within terminationGracePeriodSeconds exits 0",
                st.exit_code == 0 and took[name] < grace,
                f"exit code {st.exit_code} ({st.reason}) {took[name]:.2f} s after StopContainer (grace {grace} s); last log line: {(observer.logs(name) or [''])[-1]}")
        observer.remove()
        pods.remove(observer)

        userspace_overlay(v, kubelet, args, workload, aname, pods)
    finally:
        for p in reversed(pods):
            try:
                p.stop() if p is not observer else None
                p.remove()
            except Exception as e:
                print(f"cri: cleanup of pod {p.uid}: {e}", flush=True)
    print(f"cri: {v.failed} checks failed", flush=True)
    sys.exit(1 if v.failed else 0)


def counters(pod, name, token):
    """Every `*_total` sample of the pod's /metrics: {sample: value}."""
    out = {}
    for line in pod.metrics(name, token, "varta_").splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{", 1)[0].endswith("_total"):
            try:
                out[sample] = float(value)
            except ValueError:
                pass
    return out


def wait_counter(pod, name, token, sample, at_least, timeout):
    end = time.time() + timeout
    value = 0.0
    while time.time() < end:
        value = counters(pod, name, token).get(sample, 0.0)
        if value >= at_least:
            return value
        time.sleep(0.2)
    return value


def fds(pid):
    """The sockets a process holds: [(inode, kind)], kind unix, tcp-listen or other."""
    unix = set()
    for line in open(f"/proc/{pid}/net/unix").readlines()[1:]:
        unix.add(line.split()[6])
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in open(f"/proc/{pid}/net/{table}").readlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":
                listening.add(cols[9])
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            ino = link[8:-1]
            out.append((ino, "unix" if ino in unix else "tcp-listen" if ino in listening else "other"))
    return out


def rollout(v, kubelet, args, ds, old, name, workload, aname, apid, pods):
    """A DaemonSet rollout with maxSurge: 1, maxUnavailable: 0 on this node: a pod of the
    same template beside the old one; once it is ready the controller deletes the old pod.
    Returns the new pod."""
    strategy = ds["spec"]["updateStrategy"]
    v.check("the DaemonSet rolls with a surge", strategy.get("type") == "RollingUpdate"
            and strategy["rollingUpdate"].get("maxSurge") == 1 and strategy["rollingUpdate"].get("maxUnavailable") == 0,
            json.dumps(strategy))
    ns = ds["metadata"]["namespace"]
    wns = workload["metadata"].get("namespace", "default")
    # A second workload whose agent is wedged (SIGSTOP) 300 ms before the rollout.
    wedged = kubelet.run_pod(dict(workload, metadata=dict(workload["metadata"], name=workload["metadata"]["name"] + "-wedged")), wns)
    pods.append(wedged)
    wcid = wedged.containers[aname]
    wline = old.wait_log(name, ["event=agent_new", f"container_id={wcid}"], 30)
    wpid = wline.split(" pid=", 1)[1].split()[0] if wline else "?"
    beat = wait_counter(old, name, args.token, f'varta_beats_total{{pid="{wpid}"}}', 2, 15)
    if not v.check("the agent to wedge is tracked by the old pod", wline is not None and beat >= 2, wline or "no event=agent_new"):
        return old
    os.kill(agent_pid(wedged, aname), 19)  # SIGSTOP
    time.sleep(0.3)
    old_pid = agent_pid(old, name)
    old_cid = old.containers[name]
    before = counters(old, name, args.token)
    t0 = time.time()
    new = kubelet.run_pod(daemonset_pod(ds, "q9m4r"), ns)
    pods.append(new)
    resumed = new.wait_log(name, ["event=resumed"], 60)
    new_pid = agent_pid(new, name)
    v.check("the new pod takes over from the old one", resumed is not None and "from=handover" in resumed
            and f"peer_pid={old_pid}" in resumed and "agents=2" in resumed,
            (resumed or "no event=resumed; the new pod's log:\n" + "\n".join(new.logs(name))) + f" ({time.time() - t0:.1f} s after RunPodSandbox)")
    held = old.wait_log(name, ["event=held"], 30)
    v.check("the old container holds once it handed over", held is not None and f"peer_pid={new_pid}" in held and ":9100" in held,
            held or "no event=held; the old pod's log:\n" + "\n".join(old.logs(name)))
    # Probes as the kubelet runs them on each pod's address.
    ready, answer = new.probe_until(name, "readinessProbe", 30)
    live, live_answer = new.probe(name, "livenessProbe")
    v.check("the new pod's probes answer", ready and live, f"{new.ip}: readiness {answer}; liveness {live_answer}")
    old_ready, old_ready_answer = old.probe(name, "readinessProbe")
    old_live, old_live_answer = old.probe(name, "livenessProbe")
    v.check("the held pod is alive and not ready (no restart, out of the Service)", old_live and not old_ready,
            f"{old.ip}: liveness {old_live_answer}; readiness {old_ready_answer}")
    old_scrape = counters(old, name, args.token)
    v.check("the held pod's /metrics has no samples (its agents are counted by the new pod)", old_scrape == {},
            f"{len(old_scrape)} samples")
    socks = fds(old_pid)
    v.check("the held process keeps no socket of the observer's (only its pod's probe listener)",
            [k for _, k in socks] == ["tcp-listen"], f"sockets {socks}")
    # Counted by the new pod without a gap: carried counters never go down, the live agent
    # keeps rising and is no new agent, nothing stalls but the wedged one.
    after = counters(new, name, args.token)
    down = [f"{k}: {before[k]} -> {after.get(k)}" for k in before if after.get(k, -1.0) < before[k]]
    v.check("every counter carried across the takeover is monotonic", not down and len(before) > 3,
            f"{len(before)} samples before, none went down" if not down else "; ".join(down))
    sample = f'varta_beats_total{{pid="{apid}"}}'
    b0 = after.get(sample, 0.0)
    b1 = wait_counter(new, name, args.token, sample, b0 + 3, 15)
    v.check("the live agent is counted on by the new pod, as the same agent", b0 >= before.get(sample, 1e18) and b1 >= b0 + 3
            and not [l for l in new.logs(name) if "event=agent_new" in l and f" pid={apid} " in l],
            f"{sample}: {before.get(sample)} before, {b0} at the takeover, {b1} after")
    stall = new.wait_log(name, ["event=stall", f" pid={wpid} "], 30)
    time.sleep(1)
    stalls = [l for p, attempt in ((old, 0), (new, 0)) for l in p.logs(name, attempt) if "event=stall" in l and f" pid={wpid} " in l]
    live_stalls = [l for p in (old, new) for l in p.logs(name, 0) if "event=stall" in l and f" pid={apid} " in l]
    v.check("the agent wedged before the rollout is surfaced exactly once, naming its container; no live agent stalls",
            stall is not None and len(stalls) == 1 and f"container_id={wcid}" in stall and not live_stalls,
            f"{len(stalls)} stall lines: {stalls}; live agent's: {live_stalls}")
    st = old.status(name)
    v.check("the held container keeps running (the kubelet has nothing to restart)",
            st.state == 1 and old.containers[name] == old_cid and agent_pid(old, name) == old_pid,
            f"state {st.state}, pid {agent_pid(old, name)} (was {old_pid})")

    # The held container restarted anyway (a crash, an OOM kill): its marker holds it.
    os.kill(old_pid, 9)
    end = time.time() + 15
    while time.time() < end and old.status(name).state != 2:
        time.sleep(0.1)
    old.restart(name)
    again = old.wait_log(name, ["event=held"], 30)
    requested = [l for l in new.logs(name) if "event=takeover_requested" in l]
    v.check("a restart of the held container holds at once and takes nothing back",
            again is not None and "--hold-marker exists" in again and not requested
            and not [l for l in old.logs(name) if "event=ready" in l],
            (again or "no event=held in attempt 1:\n" + "\n".join(old.logs(name))) + f"; takeover requests seen by the new pod: {requested}")

    # The controller deletes the old pod once the new one is available: SIGTERM.
    grace, took = old.stop()
    st = old.status(name)
    v.check("the held pod, deleted, exits 0 at once on SIGTERM", st.exit_code == 0 and took[name] < 2,
            f"exit code {st.exit_code} ({st.reason}) {took[name]:.2f} s after StopContainer (grace {grace} s); "
            f"last log line: {(old.logs(name) or [''])[-1]}")
    old.remove()
    pods.remove(old)
    b2 = counters(new, name, args.token).get(sample, 0.0)
    b3 = wait_counter(new, name, args.token, sample, b2 + 3, 15)
    v.check("the new pod keeps counting after the old pod is gone", b3 >= b2 + 3, f"{sample}: {b2} -> {b3}")
    os.kill(agent_pid(wedged, aname), 18)  # SIGCONT, so that it stops as asked
    wedged.stop()
    wedged.remove()
    pods.remove(wedged)
    return new


def userspace_overlay(v, kubelet, args, workload, aname, pods):
    """deploy/kubernetes-userspace on the same node: the userspace datapath with no added
    capability, and the socket queue its sysctl sets in the pod's network namespace."""
    ds = next(d for d in yaml.safe_load_all(open(args.userspace_manifest)) if d and d["kind"] == "DaemonSet")
    name = ds["spec"]["template"]["spec"]["containers"][0]["name"]
    observer = kubelet.run_pod(daemonset_pod(ds, "u4x8d"), ds["metadata"]["namespace"])
    pods.append(observer)
    ready = observer.wait_log(name, ["event=ready"], 60)
    pace = observer.wait_log(name, ["event=receive_pace"], 5)
    v.check("the userspace overlay's pod runs the userspace datapath with a 513-datagram queue (its sysctl, in the pod's network namespace)",
            ready is not None and "datapath=userspace" in ready and pace is not None and "queue_limit=513" in pace,
            f"{ready}; {pace}" if ready else "no event=ready line; the pod's log:\n" + "\n".join(observer.logs(name)))
    opid = agent_pid(observer, name)
    caps = proc_status(opid)
    v.check("the userspace overlay's container has no capability", caps.get("CapEff") == "0" * 16 and caps.get("CapBnd") == "0" * 16,
            f"CapEff={caps.get('CapEff')} CapBnd={caps.get('CapBnd')}")
    agent = kubelet.run_pod(dict(workload, metadata=dict(workload["metadata"], name=workload["metadata"]["name"] + "-userspace")),
                            workload["metadata"].get("namespace", "default"))
    pods.append(agent)
    acid = agent.containers[aname]
    line = observer.wait_log(name, ["event=agent_new", f"container_id={acid}"], 30)
    apid = line.split(" pid=", 1)[1].split()[0] if line else "?"
    beats = wait_counter(observer, name, args.token, f'varta_beats_total{{pid="{apid}"}}', 3, 15)
    v.check("an agent in the example workload pod is tracked and counted on the userspace datapath",
            line is not None and f"pod_uid={agent.uid}" in line and beats >= 3,
            (line or "no event=agent_new for the agent's container; the observer's log:\n" + "\n".join(observer.logs(name))) + f"; beats {beats}")
    agent.stop()
    agent.remove()
    pods.remove(agent)
    grace, took = observer.stop()
    v.check("the userspace overlay's pod exits 0 on SIGTERM", observer.status(name).exit_code == 0 and took[name] < grace,
            f"{took[name]:.2f} s after StopContainer (grace {grace} s)")
    observer.remove()
    pods.remove(observer)


def daemonset_pod(ds, suffix):
    """A pod of the DaemonSet as its controller makes one: named <name>-<suffix>, the template's
    metadata and spec."""
    template = ds["spec"]["template"]
    return {"metadata": dict(template["metadata"], name=f"{ds['metadata']['name']}-{suffix}"), "spec": template["spec"]}


def proc_status(pid):
    """/proc/<pid>/status as {field: value}, values stripped."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (l.split(":", 1) for l in f if ":" in l)}


def agent_pid(pod, name):
    """The container's pid on the host (ContainerStatus verbose info)."""
    cri = pod.kubelet.cri
    resp = cri.rt("ContainerStatus", cri.msg("ContainerStatusRequest", container_id=pod.containers[name], verbose=True))
    try:
        return json.loads(resp.info["info"])["pid"]
    except Exception:
        return None


if __name__ == "__main__":
    main()
