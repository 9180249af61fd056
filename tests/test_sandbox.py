"""The sandbox (epng.sandbox) under attack: hostile programs run through `run_programs` as root and as a throwaway
unprivileged user, and through `evaluate_code`. Each must be contained and scored failed; nothing outside changes, no
process is left, no connection arrives, and a secret held by the parent (environment, memory, session keyring) is never
seen. Also: the seccomp filter's refusals, the per-sandbox cgroup where one can be made, checked limits and cleaned
output, HumanEval's 164 canonical solutions pass and broken ones fail, and what happens where no isolation is available."""
import json
import sys
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import psutil
import pytest

import epng.eval as ev
import epng.sandbox as sb
from epng.moe import EPnGError
from epng.data import byte_tokenizer
from epng.eval import load_eval_rows
from epng.sandbox import evaluate_code, humaneval_program, mbpp_program, run_program, run_programs

ROOT = os.geteuid() == 0
SECRET = "epng-sentinel-" + secrets.token_hex(16)  # in this process's environment and memory; never in any output
LIMITS = dict(timeout=3, memory_mb=512, file_mb=8, disk_mb=32, processes=32)

# The session keyring of a login (pam_keyinit makes one per session) holding a secret, and how to read it back: in this
# process for the runs as root, in the throwaway user's runner for the others. Python has no keyring API: raw syscalls.
KEYRING = r'''
import ctypes, os, struct
_KEYCALLS = {"x86_64": (250, 248), "aarch64": (219, 217)}.get(os.uname().machine)  # keyctl, add_key
_libc = ctypes.CDLL(None, use_errno=True)

def keyring_with(secret):
    "Join a fresh session keyring holding `secret` under the name epng-sentinel; False where keyrings are unavailable."
    if _KEYCALLS is None or _libc.syscall(_KEYCALLS[0], 1, None) < 0: return False  # KEYCTL_JOIN_SESSION_KEYRING
    return _libc.syscall(_KEYCALLS[1], b"user", b"epng-sentinel", secret.encode(), len(secret), -3) >= 0

def keyring_state():
    "(id, payload) of every key in this process's session keyring."
    if _KEYCALLS is None: return []
    def read(key):  # KEYCTL_READ: a keyring's key ids, or a key's payload
        buf = ctypes.create_string_buffer(4096)
        n = _libc.syscall(_KEYCALLS[0], 11, key, buf, 4096)
        return buf.raw[:max(n, 0)]
    ids = read(-3)
    return [(k, read(k).decode("latin-1")) for k in struct.unpack(f"={len(ids) // 4}i", ids)]
'''
exec(KEYRING)
# The system calls the seccomp filter refuses, by machine (the attacks use them raw, as hostile code would)
SYSCALLS = {"x86_64": dict(KEYCTL=250, ADD_KEY=248, REQUEST_KEY=249, MEMFD=319, SHMGET=29),
            "aarch64": dict(KEYCTL=219, ADD_KEY=217, REQUEST_KEY=218, MEMFD=279, SHMGET=194)}.get(os.uname().machine)

# Every program first defines `attempt`, which runs one step and prints what happened, so that one blocked step does
# not hide the next. Each ends failing its "tests": a contained attack must score failed.
PRELUDE = textwrap.dedent('''
    import os, sys
    def attempt(f, *args, **kwargs):
        try: print("done", repr(f(*args, **kwargs))[:300])
        except BaseException as e: print("blocked", type(e).__name__, str(e)[:200])
''')
FAIL = "\nassert False, 'the tests of this program fail'\n"

ATTACKS = {  # name: (what it tries, program); @OUT@ etc. are filled in by `programs`
    # --- running commands past Python-level guards
    "posix_system": ("shell through posix.system: write and delete outside", '''
        import posix
        attempt(posix.system, "id > @OUT@/pwned; echo gone > @OUT@/secret.txt; rm -f @OUT@/keep.txt")'''),
    "posix_spawn": ("posix_spawn of /bin/sh", '''
        import posix
        pid = posix.posix_spawn("/bin/sh", ["sh", "-c", "touch @OUT@/pwned; rm -f @OUT@/keep.txt"], {})
        attempt(posix.waitpid, pid, 0)'''),
    "posix_execv": ("exec /bin/sh, which ends with exit code 0", '''
        import posix
        posix.execv("/bin/sh", ["sh", "-c", "touch @OUT@/pwned; echo gone > @OUT@/secret.txt; exit 0"])'''),
    "reload_subprocess": ("importlib.reload(subprocess) to get Popen back", '''
        import importlib, subprocess
        importlib.reload(subprocess)
        attempt(subprocess.run, ["sh", "-c", "rm -f @OUT@/keep.txt; touch @OUT@/pwned; env"], capture_output=True)'''),
    "multiprocessing_spawn": ("a multiprocessing spawn child running exec", '''
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=exec, args=("open('@OUT@/pwned', 'w').write('x')",))
        attempt(p.start); attempt(p.join, 2)'''),
    # --- files outside
    "io_fileio": ("io.FileIO writes and truncates outside", '''
        import io
        attempt(lambda: io.FileIO("@OUT@/secret.txt", "w").write(b"gone"))
        attempt(lambda: io.FileIO("@OUT@/pwned", "w").write(b"x"))'''),
    "underscore_io_open": ("_io.open writes outside", '''
        import _io
        attempt(lambda: _io.open("@OUT@/pwned", "w").write("x"))
        attempt(lambda: _io.open("@OUT@/secret.txt", "a").write("more"))'''),
    "posix_open_unlink": ("posix.open/posix.unlink outside", '''
        import posix
        attempt(posix.open, "@OUT@/pwned", posix.O_WRONLY | posix.O_CREAT, 0o666)
        attempt(posix.unlink, "@OUT@/keep.txt")'''),
    "reload_os": ("importlib.reload(os), then remove outside", '''
        import importlib
        importlib.reload(os)
        attempt(os.remove, "@OUT@/keep.txt"); attempt(os.rmdir, "@OUT@/sub")'''),
    "del_sys_modules_os": ("a fresh os module, then rename outside", '''
        del sys.modules["os"]
        import os as fresh
        attempt(fresh.rename, "@OUT@/keep.txt", "@OUT@/moved.txt")'''),
    "ctypes_libc_files": ("libc unlink/creat/rename through ctypes", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.unlink(b"@OUT@/keep.txt"), libc.creat(b"@OUT@/pwned", 0o666), ctypes.get_errno())
        print(libc.rename(b"@OUT@/secret.txt", b"@OUT@/moved.txt"), ctypes.get_errno())'''),
    "ctypes_raw_syscalls": ("raw syscall(2): openat(O_CREAT), unlinkat, unshare(CLONE_NEWUSER)", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.syscall(257, -100, b"@OUT@/pwned", 0o101, 0o666), ctypes.get_errno())
        print(libc.syscall(263, -100, b"@OUT@/keep.txt", 0), ctypes.get_errno())
        print(libc.syscall(272, 0x10000000), ctypes.get_errno())'''),
    "sqlite3_outside": ("sqlite3.connect creates a database outside", '''
        import sqlite3
        attempt(lambda: sqlite3.connect("@OUT@/pwned.db").execute("create table t (x)"))'''),
    "chmod_utime_chown": ("os.chmod(fd), os.utime, os.chown on the sentinel", '''
        attempt(lambda: os.chmod(os.open("@OUT@/secret.txt", os.O_RDONLY), 0o777))
        attempt(os.utime, "@OUT@/secret.txt", (0, 0)); attempt(os.chmod, "@OUT@", 0o700)
        attempt(os.chown, "@OUT@/secret.txt", 0, 0)'''),
    "mkfifo_outside": ("os.mkfifo and os.mknod outside", '''
        attempt(os.mkfifo, "@OUT@/fifo"); attempt(os.mknod, "@OUT@/node")'''),
    "check_then_open_race": ("flip a symlink between an inside and an outside target while opening it", '''
        import threading
        open("inside", "w").close()
        def flip():
            for _ in range(2000):
                for target in ("inside", "@OUT@/secret.txt"):
                    try: os.unlink("link")
                    except OSError: pass
                    os.symlink(target, "link")
        t = threading.Thread(target=flip); t.start()
        for _ in range(2000):
            try: open("link", "a").write("x")
            except OSError: pass
        t.join()'''),
    "symlink_escape": ("symlinks to outside paths and to /proc/1/root", '''
        attempt(os.symlink, "@OUT@/secret.txt", "link"); attempt(lambda: open("link", "w").write("gone"))
        attempt(os.symlink, "/proc/1/root/@OUT@/keep.txt", "link2"); attempt(os.unlink, "link2/..")
        attempt(lambda: open("/proc/self/root/@OUT@/pwned", "w"))
        attempt(lambda: open("/proc/1/cwd/../@OUT@/pwned", "w"))'''),
    "hardlink_escape": ("hard links to the sentinel and to the interpreter", '''
        attempt(os.link, "@OUT@/secret.txt", "hard"); attempt(os.link, sys.executable, "python")
        attempt(lambda: open("hard", "w").write("gone"))'''),
    "write_python_install": ("rewrite the interpreter's stdlib that later runs import", '''
        import json
        attempt(lambda: open(os.__file__, "a").write("\\nprint('owned')\\n"))
        attempt(lambda: open(json.__file__, "w").write("x"))
        attempt(os.utime, os.__file__, (0, 0)); attempt(os.mkdir, os.path.dirname(os.__file__) + "/evil")'''),
    "writable_places": ("write to /, /dev, /dev/shm, /tmp, /usr, /etc, /root, /home, /proc", '''
        for place in ("/", "/dev", "/dev/shm", "/tmp", "/usr", "/etc", "/root", "/home", "/proc", "/run", "/var/tmp"):
            attempt(lambda: open(place + "/pwned", "w").write("x"))'''),
    "mount_chroot": ("mount a tmpfs, bind-mount, chroot out", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.mount(b"none", b"/work", b"tmpfs", 0, None), ctypes.get_errno())
        print(libc.mount(b"/", b"/work", None, 4096, None), ctypes.get_errno())
        attempt(os.chroot, "/work"); attempt(os.chdir, "/../../..")'''),
    # --- secrets of the parent
    "proc_environ": ("every /proc/<pid>/environ, the parent's first", '''
        for pid in [str(os.getppid())] + [p for p in os.listdir("/proc") if p.isdigit()]:
            attempt(lambda: open(f"/proc/{pid}/environ", "rb").read())
        print(dict(os.environ))'''),
    "proc_parent_mem": ("read the parent's memory through /proc/<ppid>/mem", '''
        ppid = os.getppid()
        def scan():
            found = []
            with open(f"/proc/{ppid}/maps") as maps, open(f"/proc/{ppid}/mem", "rb") as mem:
                for line in maps:
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    try: mem.seek(start); data = mem.read(min(end - start, 1 << 24))
                    except (OSError, ValueError, OverflowError): continue
                    i = data.find(b"epng-sentinel-")
                    if i >= 0: found.append(data[i:i + 60])
            return found
        attempt(scan)'''),
    "process_vm_readv": ("process_vm_readv and ptrace-free reads of pid 1 and the parent", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(64)
        class iovec(ctypes.Structure): _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        local, remote = iovec(ctypes.addressof(buf), 64), iovec(0x400000, 64)
        for pid in (1, os.getppid()):
            print(libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0), ctypes.get_errno())'''),
    "host_processes": ("list processes and command lines: only the sandbox's own should show", '''
        for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
            attempt(lambda: open(f"/proc/{pid}/cmdline", "rb").read()[:80])'''),
    "secret_files": ("read host secrets: shadow, root's and users' files, host /tmp", '''
        for path in ("/etc/shadow", "/etc/passwd", "/root/.bashrc", "/root/.cache/huggingface/token", "/home", "/tmp", "@OUT@"):
            attempt(lambda: os.listdir(path) if not path.startswith(("/etc", "/root/")) else open(path).read()[:200])'''),
    "sys_and_sysrq": ("read /sys, write /proc/sysrq-trigger and /proc/sys", '''
        attempt(os.listdir, "/sys"); attempt(lambda: open("/sys/kernel/uevent_helper", "w").write("/work/x"))
        attempt(lambda: open("/proc/sysrq-trigger", "w").write("h"))
        attempt(lambda: open("/proc/sys/kernel/hostname", "w").write("owned"))
        attempt(lambda: open("/proc/sys/vm/drop_caches", "w").write("3"))'''),
    # --- network
    "tcp_loopback": ("_socket to the parent's 127.0.0.1 listener", '''
        import _socket
        s = _socket.socket(); s.settimeout(1); attempt(s.connect, ("127.0.0.1", @PORT@)); attempt(s.send, b"hi")'''),
    "tcp_host_address": ("TCP to the host's own non-loopback address", '''
        import socket
        attempt(socket.create_connection, ("@HOST@", @PORT@), timeout=1)'''),
    "tcp_internet": ("TCP and UDP to public addresses", '''
        import socket
        attempt(socket.create_connection, ("1.1.1.1", 80), timeout=1)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); attempt(u.sendto, b"x", ("8.8.8.8", 53))'''),
    "dns": ("resolve names (DNS), read resolv.conf", '''
        import socket
        attempt(socket.getaddrinfo, "pypi.org", 443); attempt(socket.gethostbyname, "localhost")
        attempt(lambda: open("/etc/resolv.conf").read())'''),
    "unix_socket_path": ("connect to the parent's unix socket by path", '''
        import socket
        s = socket.socket(socket.AF_UNIX); attempt(s.connect, "@UNIX@"); attempt(s.send, b"hi")'''),
    "unix_socket_abstract": ("connect to the parent's abstract unix socket", '''
        import socket
        s = socket.socket(socket.AF_UNIX); attempt(s.connect, "\\0@ABSTRACT@"); attempt(s.send, b"hi")'''),
    "raw_and_netlink": ("raw IP and netlink sockets", '''
        import socket
        attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        attempt(socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, 0)
        attempt(socket.if_nameindex)'''),
    "setns_host": ("setns into pid 1's namespaces, unshare a new user namespace", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for ns in ("net", "mnt", "user", "pid"):
            try: fd = os.open(f"/proc/1/ns/{ns}", os.O_RDONLY)
            except OSError as e: print(ns, e); continue
            print(ns, libc.setns(fd, 0), ctypes.get_errno())
        print(libc.unshare(0x10000000 | 0x40000000), ctypes.get_errno())
        attempt(os.unshare, 0x10000000) if hasattr(os, "unshare") else None'''),
    # --- the evaluator itself
    "pidfd_kill_parent": ("pidfd_send_signal(SIGKILL) to the parent and to pid 1", '''
        import signal
        attempt(lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9))
        attempt(os.kill, 1, 9); attempt(os.kill, @PARENT@, 9)'''),
    "sigstop_parent": ("SIGSTOP to the parent, to pid 1 and to everything", '''
        import signal
        attempt(os.kill, os.getppid(), signal.SIGSTOP); attempt(os.kill, 1, signal.SIGSTOP)
        attempt(os.kill, @PARENT@, signal.SIGSTOP); attempt(os.kill, -1, signal.SIGSTOP)'''),
    "kill_everything": ("kill(-1, SIGKILL) and killpg", '''
        attempt(os.killpg, 0, 9); attempt(os.kill, -1, 9)'''),
    "ptrace_attach": ("ptrace(PTRACE_ATTACH) pid 1 and the parent", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in (1, os.getppid(), @PARENT@):
            print(pid, libc.ptrace(16, pid, None, None), ctypes.get_errno())'''),
    "stdout_fifo": ("stdout replaced by a FIFO nobody reads, then flooded", '''
        os.mkfifo("fifo")
        fd = os.open("fifo", os.O_RDWR); os.dup2(fd, 1); os.dup2(fd, 2)
        attempt(os.write, 1, b"x" * (1 << 20))'''),
    "stdout_dev_zero": ("stdout made a link to /dev/zero; try to reopen the parent's pipe", '''
        attempt(os.symlink, "/dev/zero", "out")
        attempt(lambda: os.dup2(os.open("/dev/zero", os.O_RDWR), 1))
        attempt(lambda: open("/proc/@PARENT@/fd/1", "w").write("x"))
        attempt(lambda: os.write(1, b"\\0" * (1 << 20)))'''),
    "daemon_double_fork": ("setsid + double fork: a daemon that outlives the run and writes outside", '''
        import time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for _ in range(100):
                    for path in ("@OUT@/pwned", "/work/candidate.py", "/proc/1/root/work/candidate.py"):
                        try: open(path, "w").write("owned")
                        except OSError: pass
                    time.sleep(0.1)
                os._exit(0)
            os._exit(0)
        time.sleep(0.2)'''),
    "fork_bomb": ("fork forever", '''
        while True:
            try: os.fork()
            except OSError: pass'''),
    "thread_bomb": ("threads forever", '''
        import threading, time
        while True:
            try: threading.Thread(target=time.sleep, args=(60,)).start()
            except BaseException: pass'''),
    "raise_limits": ("raise its own limits again, then fork 200 children", '''
        import resource
        for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE"):
            attempt(resource.setrlimit, getattr(resource, name), (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        kids = 0
        for _ in range(200):
            try:
                if os.fork() == 0: __import__("time").sleep(30); os._exit(0)
                kids += 1
            except OSError: pass
        print("children", kids)'''),
    "disk_fill": ("fill the disk: files until the cap", '''
        for i in range(200):
            try: open(f"f{i}", "wb").write(b"x" * (7 << 20))
            except OSError as e: print(i, e); break'''),
    "memory_hog": ("allocate far beyond the memory limit", '''
        blocks = []
        while True: blocks.append(bytearray(1 << 28))'''),
    "cpu_spin": ("spin the CPU forever", '''
        while True: pass'''),
    "fd_exhaust": ("open file descriptors until it cannot", '''
        fds = []
        while True:
            try: fds.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as e: print(len(fds), e); break'''),
    "huge_stdout": ("300 MB on stdout as fast as possible", '''
        block = b"A" * (1 << 20)
        for _ in range(300): os.write(1, block)'''),
    "huge_stderr_line": ("one 50 MB stderr line full of terminal escapes, control and invisible characters", '''
        sys.stderr.write("\\x1b[2J\\x1b]0;owned\\x07\\r\\x00\\u202e\\u061c\\ufeff\\u2060\\U000e0041\\u00ad" * 3_000_000)
        sys.stderr.flush()'''),
    "sysv_ipc": ("System V shared memory and message queues with a guessable key", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.shmget(0x45504e47, 4096, 0o1666), libc.msgget(0x45504e47, 0o1666), ctypes.get_errno())'''),
    # --- what namespaces do not separate: the kernel keyrings; memory that per-process limits do not count
    "keyring_read": ("read the caller's session and user keyrings, search and request its keys, /proc/keys", '''
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(4096)
        for ring in (-3, -4, -5):  # session, user, user-session keyring
            n = libc.syscall(@KEYCTL@, 11, ring, buf, 4096); print("ring", ring, n, ctypes.get_errno())
            for key in struct.unpack(f"={max(n, 0) // 4}i", buf.raw[:max(n, 0) // 4 * 4]):
                m = libc.syscall(@KEYCTL@, 11, key, buf, 4096); print(key, buf.raw[:max(m, 0)])
        key = libc.syscall(@KEYCTL@, 10, -3, b"user", b"epng-sentinel", 0); print("search", key, ctypes.get_errno())
        m = libc.syscall(@KEYCTL@, 11, key, buf, 4096); print(buf.raw[:max(m, 0)])
        print("request", libc.syscall(@REQUEST_KEY@, b"user", b"epng-sentinel", None, 0), ctypes.get_errno())
        print("x32", libc.syscall(0x40000000 | @KEYCTL@, 10, -3, b"user", b"epng-sentinel", 0), ctypes.get_errno())
        attempt(lambda: open("/proc/keys").read()); attempt(lambda: open("/proc/key-users").read())'''),
    "keyring_write": ("add to, overwrite, revoke and clear the caller's session keyring; join a named one", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print("add", libc.syscall(@ADD_KEY@, b"user", b"epng-note", b"from a sandbox", 14, -3), ctypes.get_errno())
        key = libc.syscall(@KEYCTL@, 10, -3, b"user", b"epng-sentinel", 0)
        print("update", libc.syscall(@KEYCTL@, 2, key, b"forged", 6), ctypes.get_errno())
        print("revoke", libc.syscall(@KEYCTL@, 3, key), ctypes.get_errno())
        print("clear", libc.syscall(@KEYCTL@, 7, -3), ctypes.get_errno())
        print("join", libc.syscall(@KEYCTL@, 1, b"epng-shared"), ctypes.get_errno())'''),
    "i386_abi_keyctl": ("keyctl through the i386 ABI (int 0x80), whose numbers a filter for x86_64 would miss", '''
        import ctypes, mmap
        if os.uname().machine == "x86_64":  # push rbx; eax=288 (i386 keyctl), ebx=0, ecx=-3, edx=0; int 0x80; pop rbx; ret
            code = bytes.fromhex("53b820010000bb00000000b9fdffffffba00000000cd805bc3")
            page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC); page.write(code)
            call = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
            print("i386 session keyring", call())'''),
    "memfd_growth": ("grow memory no rlimit counts: memory files, 4 MB at a time", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print("raw memfd", libc.syscall(@MEMFD@, b"raw", 0), ctypes.get_errno())
        fds = []
        for i in range(200):
            try: fd = os.memfd_create(f"m{i}"); os.write(fd, b"x" * (4 << 20)); fds.append(fd)
            except OSError as e: print("stopped", i, type(e).__name__, e); break
        print("memfds", len(fds))'''),
    "sysv_shm_growth": ("grow memory no rlimit counts: 100 MB System V segments, attached, touched, detached", '''
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmat.restype = ctypes.c_void_p; libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        made = 0
        for _ in range(8):
            sid = libc.shmget(0, 100 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
            if sid < 0: print("shmget", sid, ctypes.get_errno()); break
            addr = libc.shmat(sid, None, 0); ctypes.memset(addr, 1, 100 << 20); libc.shmdt(ctypes.c_void_p(addr))
            made += 1
        print("segments", made)'''),
    # --- forging the score
    "main_done_forgery": ("write the old prologue's token from __main__, then os._exit(0)", '''
        import __main__
        os.write(1, b"\\n" + getattr(__main__, "_done", b"passed") + b"\\n"); os._exit(0)'''),
    "os_exit_zero": ("os._exit(0) before the failing asserts", '''
        os._exit(0)'''),
    "sys_exit_zero": ("sys.exit(0) before the failing asserts", '''
        sys.exit(0)'''),
    "kill_self": ("SIGKILL itself before the failing asserts", '''
        os.kill(os.getpid(), 9)'''),
    "close_stdout": ("close stdout and stderr, then sys.exit(0)", '''
        os.close(1); os.close(2); sys.exit(0)'''),
    "print_pass_markers": ("print what a lazy scorer might take as success", '''
        print("passed"); print("\\n".join(os.urandom(16).hex() for _ in range(50))); print("ALL TESTS PASSED")'''),
    "result_fd_junk": ("write to every open descriptor, then os._exit(0)", '''
        for fd in map(int, os.listdir("/proc/self/fd")):
            try: os.write(fd, b"\\n" + os.urandom(16).hex().encode() + b"\\n")
            except OSError: pass
        os._exit(0)'''),
    "excepthook_and_atexit": ("swallow the failure in sys.excepthook, exit 0 from atexit", '''
        import atexit
        sys.excepthook = lambda *a: os._exit(0)
        atexit.register(os._exit, 0)'''),
}


def programs(values: dict) -> dict:
    "The attack programs with the arena's paths, ports and pids filled in."
    out = {}
    for name, (_, body) in ATTACKS.items():
        code = PRELUDE + textwrap.dedent(body) + FAIL
        for key, value in values.items(): code = code.replace(f"@{key}@", str(value))
        out[name] = code
    return out


def test_there_are_at_least_forty_attacks():
    assert len(ATTACKS) >= 40 and all(len(what) > 10 for what, _ in ATTACKS.values())


class Arena:
    "What the attacks target: a world-writable sentinel folder outside, listeners, a secret; and how to check them."
    def __init__(self):
        self.out = Path(tempfile.mkdtemp(prefix="epng-sentinel-"))
        (self.out / "sub").mkdir()
        for name in ("secret.txt", "keep.txt"): (self.out / name).write_text(f"{name}: {SECRET}\n")
        for path in [self.out, self.out / "sub", *self.out.glob("*.txt")]:  # writable by anyone: only the sandbox stops it
            path.chmod(0o777 if path.is_dir() else 0o666)
        self.accepted = []
        self.tcp = socket.create_server(("0.0.0.0", 0)); self.port = self.tcp.getsockname()[1]
        self.unix_path = str(self.out / "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX); self.unix.bind(self.unix_path); self.unix.listen()
        os.chmod(self.unix_path, 0o777)
        self.abstract = "epng-sentinel-" + secrets.token_hex(4)
        self.abstract_sock = socket.socket(socket.AF_UNIX); self.abstract_sock.bind("\0" + self.abstract)
        self.abstract_sock.listen()
        for s in (self.tcp, self.unix, self.abstract_sock): s.settimeout(0.1)
        self.watched = [Path(os.__file__), Path(json.__file__)]
        self.before = self.snapshot()

    def values(self) -> dict:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try: s.connect(("192.0.2.1", 9)); host = s.getsockname()[0]  # no packet is sent: just the route's address
        except OSError: host = "127.0.0.1"
        finally: s.close()
        return dict(OUT=self.out, PORT=self.port, HOST=host, UNIX=self.unix_path, ABSTRACT=self.abstract,
                    PARENT=os.getpid(), **(SYSCALLS or dict.fromkeys(["KEYCTL", "ADD_KEY", "REQUEST_KEY", "MEMFD",
                                                                      "SHMGET"], -1)))

    def snapshot(self) -> dict:
        state = {}
        for path in sorted(self.out.rglob("*")) + [self.out] + self.watched:
            st = path.lstat()
            state[str(path)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns,
                                path.read_bytes() if path.is_file() and not path.is_symlink() else None)
        state["session keyring"] = keyring_state()
        state["sandbox cgroups"] = leftover_cgroups()
        return state

    def connections(self) -> int:
        n = 0
        for s in (self.tcp, self.unix, self.abstract_sock):
            while True:
                try: s.accept()[0].close(); n += 1
                except OSError: break
        return n

    def close(self):
        for s in (self.tcp, self.unix, self.abstract_sock): s.close()
        shutil.rmtree(self.out, ignore_errors=True)


def leftover_cgroups() -> list:
    "Sandbox cgroups still on the machine (each is removed when its run ends)."
    return sorted(str(p) for parent in sb._cgroup_parents() for p in Path(parent).glob("epng-sandbox-*"))


def sandbox_processes() -> list:
    "Processes left by sandboxes: the random high uids bwrap runs as, or anything still running the harness."
    left = []
    for p in psutil.process_iter(["uids", "cmdline", "status"]):
        try:
            # a killed sandbox's init is a zombie until the machine's init reaps it: dead, holding nothing but a pid
            if p.info["status"] == psutil.STATUS_ZOMBIE: continue
            if p.info["uids"] and max(p.info["uids"]) >= 1 << 30: left.append(p)
            elif p.info["cmdline"] and any("_harness" in a for a in p.info["cmdline"]): left.append(p)
        except psutil.Error: pass
    return left


def check_result(name: str, r: dict):
    "What every attack's result must show: failed, bounded and clean output, no secret."
    assert not r["passed"], f"{name} scored passed: {r['status']}"
    assert r["status"] != "passed" and len(r["status"]) <= 220
    assert len(r["stdout"]) <= sb.OUTPUT_CHARS and len(r["stderr"]) <= sb.OUTPUT_CHARS
    for text in (r["status"], r["stdout"], r["stderr"]):
        assert SECRET not in text
        assert not any(c in text for c in "\x00\x1b\x07\r\u202e\u061c\ufeff\u2060\U000e0041\u00ad")


@pytest.fixture(scope="module")
def secret_in_environment():
    "The secret in this process's environment and memory, and in the session keyring it joins."
    os.environ["EPNG_SENTINEL_SECRET"] = SECRET
    keyring_with(SECRET)
    yield SECRET
    del os.environ["EPNG_SENTINEL_SECRET"]


@pytest.fixture(scope="module")
def as_root(secret_in_environment):
    "Every attack run once through run_programs by this process; what changed around it."
    if sb.isolation_problem(): pytest.skip(f"no isolation here: {sb.isolation_problem()}")
    arena = Arena()
    try:
        names = list(ATTACKS)
        results = run_programs(list(programs(arena.values()).values()), workers=4, **LIMITS)
        time.sleep(0.5)  # a surviving daemon would write within 0.1 s
        yield dict(results={n: vars(r) for n, r in zip(names, results)}, changed=arena.snapshot() != arena.before,
                   before=arena.before, after=arena.snapshot(), connections=arena.connections(),
                   left=sandbox_processes(), children=psutil.Process().children(recursive=True))
    finally:
        arena.close()


@pytest.mark.parametrize("runner", ["as_root", "as_user"])  # the caller (root here), then a throwaway user
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_contained(request, runner, name):
    r = request.getfixturevalue(runner)["results"][name]
    check_result(name, r)
    assert r["isolated"]


def test_attacks_left_nothing_behind_as_caller(as_root):
    assert as_root["after"] == as_root["before"], "something outside the sandbox changed"
    if SYSCALLS: assert SECRET in str(as_root["before"]["session keyring"]), "the keyring sentinel was not set up"
    assert as_root["connections"] == 0, "a listener outside the sandbox was reached"
    assert as_root["left"] == [] and as_root["children"] == [], "processes outlived their sandbox"


def test_stops_are_the_right_ones(as_root):
    "The limits that stop the attacks are the ones named in the status."
    res = as_root["results"]
    assert res["cpu_spin"]["status"] == "timeout" and res["memory_hog"]["status"] == "memory"
    assert res["disk_fill"]["status"].startswith("error: AssertionError")
    assert "No space left on device" in res["disk_fill"]["stdout"] or "File too large" in res["disk_fill"]["stdout"]
    assert res["sys_exit_zero"]["status"].startswith("error: SystemExit")
    assert res["os_exit_zero"]["status"] == "exit code 0 before the tests finished"
    assert "children" in res["raise_limits"]["stdout"]
    assert int(res["raise_limits"]["stdout"].split("children")[1].split()[0]) < LIMITS["processes"]


def check_refused_calls(res: dict):
    "The seccomp filter's refusals, as the attacks saw them: EPERM (errno 1) for keyrings, memory files, shm; i386 killed."
    if os.uname().machine not in sb._SECCOMP_MACHINES: pytest.skip("no seccomp filter for this machine")
    read, write = res["keyring_read"]["stdout"], res["keyring_write"]["stdout"]
    assert re.findall(r"^ring (-\d) (-?\d+) (\d+)$", read, re.M) == [("-3", "-1", "1"), ("-4", "-1", "1"), ("-5", "-1", "1")]
    for line in ("search -1 1", "request -1 1", "x32 -1 1"): assert line in read.splitlines()
    for line in ("add -1 1", "update -1 1", "revoke -1 1", "clear -1 1", "join -1 1"): assert line in write.splitlines()
    assert "epng-sentinel" not in read + res["keyring_read"]["stderr"]  # not even the key's name, via /proc/keys
    if os.uname().machine == "x86_64":  # SIGSYS from the filter (SIGSEGV where the kernel has no i386 ABI)
        assert res["i386_abi_keyctl"]["status"] in ("killed by signal 31", "killed by signal 11")
        assert "i386 session keyring" not in res["i386_abi_keyctl"]["stdout"]
    memfd = res["memfd_growth"]["stdout"].splitlines()
    assert "raw memfd -1 1" in memfd and "stopped 0 PermissionError [Errno 1] Operation not permitted" in memfd
    assert "memfds 0" in memfd
    assert "shmget -1 1" in res["sysv_shm_growth"]["stdout"] and "segments 0" in res["sysv_shm_growth"]["stdout"]


def test_refused_system_calls_as_caller(as_root):
    check_refused_calls(as_root["results"])


# --- as an unprivileged user -----------------------------------------------------------------------------------

RUNNER = KEYRING + '''
import importlib.util, json, sys
keyring_with(os.environ["EPNG_SENTINEL_SECRET"]); keys_before = keyring_state()
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(sandbox)
results = sandbox.run_programs(json.load(open(sys.argv[2])), workers=4, **json.loads(sys.argv[4]))
json.dump(dict(results=[vars(r) for r in results], keys_before=keys_before, keys_after=keyring_state()),
          open(sys.argv[3], "w"))
'''


@pytest.fixture(scope="module")
def as_user(secret_in_environment):
    "The same attacks, run by a throwaway unprivileged user with Debian's python3 and sandbox.py loaded alone."
    if not ROOT: pytest.skip("creating a throwaway user needs root")
    if shutil.which("useradd") is None: pytest.skip("useradd is missing: cannot create a throwaway user")
    if not os.path.exists("/usr/bin/python3"): pytest.skip("/usr/bin/python3 is missing: the user cannot run root's Python")
    name = "epngsb" + secrets.token_hex(3)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    folder = Path(tempfile.mkdtemp(prefix="epng-user-"))
    arena = Arena()
    try:
        uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
        folder.chmod(0o755)
        shutil.copy(sb.__file__, folder / "sandbox.py")
        (folder / "runner.py").write_text(RUNNER)
        (folder / "programs.json").write_text(json.dumps(list(programs(arena.values()).values())))
        (folder / "results").mkdir(); os.chown(folder / "results", uid, uid)
        env = {"PATH": "/usr/bin:/bin", "EPNG_SENTINEL_SECRET": SECRET, "HOME": str(folder)}
        done = subprocess.run(["/usr/bin/python3", "-I", "runner.py", "sandbox.py", "programs.json", "results/r.json",
                               json.dumps(LIMITS)], cwd=folder, env=env, user=uid, group=uid, extra_groups=[],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        ran = json.loads((folder / "results" / "r.json").read_text())
        time.sleep(0.5)
        left = [p for p in psutil.process_iter(["uids", "status"])
                if p.info["uids"] and uid in p.info["uids"] and p.info["status"] != psutil.STATUS_ZOMBIE]
        yield dict(results=dict(zip(ATTACKS, ran["results"])), before=arena.before, after=arena.snapshot(),
                   connections=arena.connections(), left=left, keys_before=ran["keys_before"],
                   keys_after=ran["keys_after"])
    finally:
        arena.close()
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True)


def test_attacks_left_nothing_behind_as_unprivileged_user(as_user):
    assert as_user["after"] == as_user["before"], "something outside the sandbox changed"
    assert as_user["connections"] == 0, "a listener outside the sandbox was reached"
    assert as_user["left"] == [], "processes of the throwaway user outlived their sandbox"
    assert as_user["keys_after"] == as_user["keys_before"], "the user's session keyring changed"
    if SYSCALLS: assert SECRET in str(as_user["keys_before"]), "the keyring sentinel was not set up"


def test_refused_system_calls_as_unprivileged_user(as_user):
    check_refused_calls(as_user["results"])


# --- through evaluate_code -------------------------------------------------------------------------------------

def test_attacks_as_completions_through_evaluate_code(monkeypatch, secret_in_environment):
    "Completions that attack, scored by evaluate_code's real program building and running (generation replaced)."
    if sb.isolation_problem(): pytest.skip(f"no isolation here: {sb.isolation_problem()}")
    arena = Arena()
    try:
        rows = load_eval_rows("humaneval", "embedded")[:2]
        body = "    import os, sys\n"
        attacks = [body + "    import __main__\n    os.write(1, b'\\n' + getattr(__main__, '_done', b'') + b'\\n')\n"
                          "    os._exit(0)\n",
                   body + f"    import posix\n    posix.system('rm -f {arena.out}/keep.txt')\n    sys.exit(0)\n",
                   body + "    print(open(f'/proc/{os.getppid()}/environ').read())\n    os._exit(0)\n",
                   f"```python\nimport os\nos.unlink('{arena.out}/keep.txt')\nos._exit(0)\n```"]
        recorded = [[rows[0]["canonical_solution"], *attacks], [rows[1]["canonical_solution"], *attacks]]
        monkeypatch.setattr(ev, "generate", lambda *a, **k: recorded)
        result = evaluate_code(None, byte_tokenizer(), rows, kind="humaneval", n=5, k=(1, 5), timeout=5, progress=False)
        assert [r["passed"] for r in result.records] == [1, 1]
        assert result.scores["pass@1"] == pytest.approx(0.2) and result.score == 1.0
        statuses = [s for r in result.records for s in r["statuses"]]
        assert statuses.count("passed") == 2 and all(len(s) <= 220 for s in statuses)
        assert SECRET not in json.dumps(result.records)
        assert arena.snapshot() == arena.before and arena.connections() == 0
    finally:
        arena.close()


def test_evaluate_code_scores_recorded_completions(monkeypatch):
    "pass@k from known outcomes: generation replaced by recorded completions, the programs really run."
    rows = load_eval_rows("mbpp", "embedded")[:2]
    right, wrong = rows[0]["code"], "def second_largest(nums):\n    return 0"
    recorded = [[right, wrong, wrong, right], ["```python\n" + rows[1]["code"] + "\n```", "", "", ""]]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: recorded)
    result = evaluate_code(None, byte_tokenizer(), rows, kind="mbpp", n=4, k=(1, 2, 4), timeout=5, progress=False)
    assert [r["passed"] for r in result.records] == [2, 1]
    assert result.scores["pass@1"] == pytest.approx((0.5 + 0.25) / 2)
    assert result.scores["pass@4"] == 1.0 and result.score == 1.0
    with pytest.raises(EPnGError, match="pass@10 needs at least 10"):
        evaluate_code(None, byte_tokenizer(), rows, kind="mbpp", n=4, k=(10,))


# --- ordinary programs still run -------------------------------------------------------------------------------

def test_all_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    humaneval = load_eval_rows("humaneval", "embedded")
    mbpp = load_eval_rows("mbpp", "embedded")
    good = [humaneval_program(p, p["canonical_solution"]) for p in humaneval] + [mbpp_program(r, r["code"]) for r in mbpp]
    broken = [humaneval_program(p, "    return None\n") for p in humaneval] + [mbpp_program(mbpp[0], "def f():\n    pass")]
    results = run_programs(good + broken, timeout=10)
    assert len(humaneval) == 164
    failed_good = [(i, r.status) for i, r in enumerate(results[:len(good)]) if not r.passed]
    assert failed_good == []
    assert not any(r.passed for r in results[len(good):])


def test_output_tail_and_status_are_bounded_and_clean():
    r = run_program("import sys\nprint('\\x1b[31mred\\x1b[0m ' * 10_000)\nsys.stderr.write('x' * 9000 + '\\x07')\n"
                    "assert False, 'z' * 5000", timeout=5)
    assert not r.passed and len(r.stdout) == sb.OUTPUT_CHARS and len(r.stderr) <= sb.OUTPUT_CHARS
    assert "\x1b" not in r.stdout and "\x07" not in r.stderr and len(r.status) <= 220
    assert r.status.startswith("error: ") and r.status.endswith("z" * 100)  # the tail of a 5000-character line


def test_output_drops_invisible_characters():
    "Unicode categories Cc, Cf, Co, Cs, Zl, Zp leave the output; newline, tab and visible text stay."
    hidden = "\u061c\ufeff\u2060\u2064\U000e0041\U000e0042\u00ad\u200b\u202e\u2066\u2028\u2029\ue000\U000f0000\x1b\x7f\x85\r"
    text = "A" + hidden + "b" + chr(0x2063) + "é\n\tz"
    r = run_program(f"import sys\nsys.stdout.write({text!r})\nassert False", timeout=5)
    assert r.stdout == "Abé\n\tz" and not r.passed
    assert sb._clean(b"ok\xed\xa0\x80!") == "ok\ufffd\ufffd\ufffd!"  # an encoded surrogate is invalid UTF-8: replaced


def test_runner_bad_limits():
    bad_limits = [dict(timeout=0), dict(timeout=-1), dict(timeout=float("inf")), dict(timeout=float("nan")),
                  dict(timeout=True), dict(timeout="3"), dict(memory_mb=-1), dict(memory_mb=1.5), dict(memory_mb=True),
                  dict(memory_mb=2 ** 41), dict(file_mb=0), dict(disk_mb=2 ** 50), dict(processes=0),
                  dict(processes=10 ** 30), dict(processes=False), dict(processes=4.0)]
    for bad in bad_limits:
        with pytest.raises(EPnGError, match=f"{next(iter(bad))} must be a"):
            run_program("pass", **bad)
        with pytest.raises(EPnGError, match="must be a"):  # the batch is refused before any program runs
            run_programs(["pass"], **bad)
    with pytest.raises(EPnGError, match="no limit 'memory'"):
        run_programs(["pass"], memory=64)
    assert run_program("pass", timeout=2, memory_mb=256, processes=1).passed  # the smallest limits still run Python


def test_unencodable_program_fails_alone():
    "A lone surrogate (text decoded with surrogateescape) scores that program failed; the rest of the batch runs."
    results = run_programs(["assert 1 + 1 == 2", "text = '\udc80'\n", "assert 2 * 2 == 4", "assert False"], workers=2)
    assert [r.passed for r in results] == [True, False, True, False]
    assert results[1].status == "error: the program is not valid UTF-8 text (surrogates not allowed at character 8)"
    assert results[1].returncode is None


def test_keyring_carries_nothing_between_runs(secret_in_environment):
    "One run stores a note in the session keyring and a later run looks for it: refused both times, keyring unchanged."
    if sb.isolation_problem(): pytest.skip(f"no isolation here: {sb.isolation_problem()}")
    if not SYSCALLS: pytest.skip(f"no keyring system-call numbers for {os.uname().machine}")
    before = keyring_state()
    write = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"print(libc.syscall({SYSCALLS['ADD_KEY']}, b'user', b'note', b'hello from run 1', 16, -3), ctypes.get_errno())")
    read = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(64)\n"
            f"key = libc.syscall({SYSCALLS['KEYCTL']}, 10, -3, b'user', b'note', 0)\n"
            f"n = libc.syscall({SYSCALLS['KEYCTL']}, 11, key, buf, 64)\nprint(key, ctypes.get_errno(), buf.raw[:max(n, 0)])")
    first, second = run_program(write, timeout=5), run_program(read, timeout=5)
    assert first.stdout == "-1 1\n" and second.stdout == "-1 1 b''\n"
    assert keyring_state() == before and SECRET in str(before)


def cgroup_or_skip():
    if sb.isolation_problem(): pytest.skip(f"no isolation here: {sb.isolation_problem()}")
    if not sb._cgroup_parents():
        pytest.skip("no cgroup for sandboxes here (needs root and writable memory+pids cgroups): limits are per process")


def test_cgroup_caps_memory_of_all_processes():
    "Six children of 100 MB each under memory_mb=256: each is within RLIMIT_AS, together they are not: OOM-killed."
    cgroup_or_skip()
    program = textwrap.dedent('''
        import os, time
        kids = []
        for _ in range(6):
            if (pid := os.fork()) == 0:
                block = b"x" * (100 << 20); time.sleep(1); os._exit(0)
            kids.append(pid)
        killed = sum(os.waitpid(pid, 0)[1] == 9 for pid in kids)
        print("killed", killed)
        assert killed == 0
        ''')
    r = run_program(program, timeout=10, memory_mb=256, processes=10)
    assert r.status == "memory"
    assert "killed" not in r.stdout or int(r.stdout.split()[1]) >= 4  # two fit in 256 MB at most
    assert leftover_cgroups() == []


def test_cgroup_is_joined_with_the_limits(monkeypatch):
    "While a sandbox runs, its processes are in a cgroup of its own with memory_mb and processes + 2 as limits."
    cgroup_or_skip()
    made, new_cgroup = [], sb._new_cgroup
    monkeypatch.setattr(sb, "_new_cgroup", lambda *a: made.append(new_cgroup(*a)) or made[-1])
    seen = {}
    def look():
        while not made: time.sleep(0.01)
        time.sleep(0.8)  # the sandbox is up and sleeping
        for path in made[0]:
            for name in ("cgroup.procs", "memory.limit_in_bytes", "memory.max", "pids.max"):
                if (Path(path) / name).exists(): seen[name] = (Path(path) / name).read_text().split()
    watcher = __import__("threading").Thread(target=look); watcher.start()
    r = run_program("import time\ntime.sleep(2)", timeout=5, memory_mb=200, processes=3)
    watcher.join()
    assert r.passed and len(seen["cgroup.procs"]) == 3  # bwrap, its init, the harness
    assert (seen.get("memory.limit_in_bytes") or seen["memory.max"]) == [str(200 << 20)] and seen["pids.max"] == ["5"]
    assert all(not Path(p).exists() for p in made[0]) and leftover_cgroups() == []


# --- where no isolation is available ---------------------------------------------------------------------------

@pytest.mark.parametrize("bwrap", ["/nonexistent/bwrap", "/bin/false"])
def test_no_isolation_refuses_unless_allowed(monkeypatch, bwrap):
    monkeypatch.setattr(sb, "BWRAP", bwrap)
    monkeypatch.setattr(sb, "_ISOLATION", {})
    monkeypatch.setattr(sb, "_WARNED", False)
    assert sb.isolation_problem() is not None
    for run in (lambda: run_program("pass"), lambda: run_programs(["pass"]),
                lambda: evaluate_code(None, byte_tokenizer(), load_eval_rows("mbpp", "embedded")[:1], kind="mbpp", n=1,
                                      k=(1,), progress=False)):
        with pytest.raises(EPnGError, match="bubblewrap") as e:
            run()
        assert "allow_unisolated=True" in str(e.value) and "user namespaces" in str(e.value)
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        ok = run_program("print('hi')\nassert 1 + 1 == 2", allow_unisolated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second run warns no more
        early = run_programs(["import os\nos._exit(0)\nassert False", "assert False"], allow_unisolated=True)
    assert ok.passed and not ok.isolated and ok.stdout == "hi\n"
    assert [r.passed for r in early] == [False, False]


def test_a_python_installed_under_tmp_runs_sandboxed(tmp_path):
    "As root the Python is staged under a tmpfs of its own: a venv in /tmp must not be hidden by it."
    if not ROOT: pytest.skip("the root stage runs only as root")
    venv = Path(tempfile.mkdtemp(prefix="epng-venv-", dir="/tmp"))
    venv.chmod(0o755)  # as a venv made by `python -m venv` in a folder of its own would be
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        shutil.copy(sb.__file__, tmp_path / "sandbox.py")
        script = ("import importlib.util, sys\n"
                  "spec = importlib.util.spec_from_file_location('sandbox', sys.argv[1])\n"
                  "sb = sys.modules['sandbox'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(sb)\n"
                  "r = sb.run_program('import sys; assert sys.prefix.startswith(\"/tmp/\")', timeout=20)\n"
                  "print(r.passed, r.isolated, r.status)\n")
        done = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", script, str(tmp_path / "sandbox.py")],
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["True", "True", "passed"], done.stdout + done.stderr[-2000:]
    finally:
        shutil.rmtree(venv, ignore_errors=True)
