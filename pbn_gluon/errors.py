"""User errors: what a user can fix (a config value, a path, a damaged file, an environment
setting), reported by every script as ONE line on stderr with exit code 2.

    from pbn_gluon.errors import UserError, user_errors

    def main():
        with user_errors('train.py'):
            ...                        # raise UserError('what is wrong and what to do')

A traceback is printed instead when the environment has ``PBN_GLUON_DEBUG=1`` (or a script is
given ``--debug``). Anything that is not a UserError is a bug and keeps its traceback.
"""
import argparse
import contextlib
import os
import sys

__all__ = ['UserError', 'ConfigError', 'CheckpointError', 'DataError', 'DataNotFoundError', 'DEBUG_ENV',
           'debug_enabled', 'one_line', 'user_errors', 'ArgumentParser', 'positive_int',
           'non_negative_int']

#: set to 1 to get the traceback of a user error
DEBUG_ENV = 'PBN_GLUON_DEBUG'

#: exit code of a user error (argparse's own)
EXIT_CODE = 2


class UserError(Exception):
    """An error the user can fix; its message names the culprit and what to do."""


class ConfigError(UserError, ValueError):
    """A config key or value that is not allowed."""


class CheckpointError(UserError, OSError):
    """A checkpoint file that cannot be read or written, or does not fit the config."""


class DataError(UserError, OSError):
    """A dataset file that cannot be read."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset (or a file it needs) that is missing, empty or incomplete."""


def debug_enabled():
    return os.environ.get(DEBUG_ENV, '').strip() not in ('', '0') or '--debug' in sys.argv[1:]


def one_line(message):
    """`message` on one line (a multi-line message is joined with '; ')."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return '; '.join(lines)


def _prog(prog):
    return prog or os.path.basename(sys.argv[0] or 'pbn_gluon')


@contextlib.contextmanager
def user_errors(prog=None, catch=(UserError,)):
    """Report the UserError (or other `catch` type) raised inside as one line
    ``PROG: error: MESSAGE`` on stderr and exit with code 2; under PBN_GLUON_DEBUG=1 the
    exception propagates with its traceback."""
    try:
        yield
    except catch as err:
        if debug_enabled():
            raise
        sys.stdout.flush()
        sys.stderr.write('%s: error: %s\n' % (_prog(prog), one_line(err) or type(err).__name__))
        sys.stderr.flush()
        sys.exit(EXIT_CODE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``PROG: error: MESSAGE (see --help)``, exit 2)
    instead of the usage block, and a --debug switch (tracebacks of user errors)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument('--debug', action='store_true',
                          help='show the traceback of a user error (or set %s=1)' % DEBUG_ENV)

    def error(self, message):
        sys.stderr.write('%s: error: %s (see --help)\n' % (self.prog, one_line(message)))
        sys.exit(EXIT_CODE)


def _int_at_least(lowest, what):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError('expected %s, got %r' % (what, text)) from None
        if value < lowest:
            raise argparse.ArgumentTypeError('expected %s, got %r' % (what, text))
        return value
    parse.__name__ = what
    return parse


#: argparse types: an integer >= 1 / >= 0
positive_int = _int_at_least(1, 'an integer >= 1')
non_negative_int = _int_at_least(0, 'an integer >= 0')
