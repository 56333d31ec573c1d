"""Runs one worker on a remote host for pbn_gluon.launch (its source goes over ssh as
``python3 -c SOURCE SPEC``; standard library only, Python 3.5+).

SPEC (JSON): {"cwd": dir, "env": {name: value}, "command": [program, args...]}. The command
runs in its own process group, stdin closed. The wrapper's stdin is the ssh channel: when it
closes (the launcher stops the job, dies, or loses the connection) the group gets SIGTERM, and
SIGKILL 5 s later. Once the command ends, whatever is left of its group is killed, and one
status line goes to stderr for the launcher (ssh itself turns a remote signal into 255):

    PBN_GLUON_LAUNCH_STATUS exit CODE            CODE < 0: killed by signal -CODE
    PBN_GLUON_LAUNCH_STATUS start-failed CODE MESSAGE     127: no such program, 126: not runnable
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

TOKEN = 'PBN_GLUON_LAUNCH_STATUS'
GRACE = 5.0


def report(*fields):
    sys.stderr.write('%s %s\n' % (TOKEN, ' '.join(str(f) for f in fields)))
    sys.stderr.flush()


def kill_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except OSError:     # the group is gone already
        pass


def stop_on_eof(proc):
    """Block until the ssh channel closes, then stop the command's group."""
    while os.read(0, 65536):
        pass
    kill_group(proc.pid, signal.SIGTERM)
    deadline = time.time() + GRACE
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_group(proc.pid, signal.SIGKILL)


def main(spec):
    env = dict(os.environ)
    env.update(spec['env'])
    try:
        os.chdir(spec['cwd'])
        proc = subprocess.Popen(spec['command'], env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as err:
        code = 127 if isinstance(err, FileNotFoundError) else 126
        report('start-failed', code, '%s: %s' % (err.filename or spec['command'][0],
                                                 err.strerror or err))
        return code
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, lambda s, f: kill_group(proc.pid, signal.SIGTERM))
    threading.Thread(target=stop_on_eof, args=(proc,), daemon=True).start()
    code = proc.wait()
    kill_group(proc.pid, signal.SIGKILL)    # children the command left behind
    report('exit', code)
    return code if code >= 0 else 128 - code


if __name__ == '__main__':
    sys.exit(main(json.loads(sys.argv[1])))
