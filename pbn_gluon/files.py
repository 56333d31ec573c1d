"""Result and state files: written whole or not at all, and free of this machine's paths.

    write_json(path, obj)     # a temporary file, then os.replace: a kill leaves the old file
    write_text(path, text)
    portable(text)            # the venv -> <venv>, the repository and working directory -> .
"""
import json
import os
import sys

__all__ = ['write_json', 'write_text', 'portable']

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_text(path, text, sync=False):
    """Replace `path` by `text` atomically (nothing left behind when it fails); sync: fsync
    before the rename, for files a resumed run depends on."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj, sync=False, **dump_args):
    """Replace `path` by the JSON of `obj` atomically (indent 1 unless told)."""
    dump_args.setdefault('indent', 1)
    write_text(path, json.dumps(obj, **dump_args), sync=sync)


def portable(text):
    """`text` (a traceback, a log tail) for a shared results file: no paths of this machine."""
    text = text.replace(sys.prefix, '<venv>').replace(REPOSITORY, '.')
    return text.replace(os.getcwd(), '.') if os.getcwd() != os.sep else text
