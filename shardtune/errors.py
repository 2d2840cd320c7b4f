"""User-facing errors. Each message names the input at fault and the fix; the CLI prints it as one line, exit 2."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when empty), cut to `limit` characters: what a
    one-line error quotes from a library's own message."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class ShardtuneError(Exception):
    """Base class for errors caused by the user's input or environment (not by a bug)."""
    exit_code = 2


class ConfigError(ShardtuneError):
    """A config key or value is wrong."""


class DataError(ShardtuneError):
    """A data file is missing, unreadable, malformed or empty."""


class ModelError(ShardtuneError):
    """A model directory, architecture or checkpoint cannot be used."""


class EnvironmentProblem(ShardtuneError):
    """The installed packages or the hardware cannot run what the config asks for."""


class DoesNotFit(ShardtuneError):
    """The plan predicts the run will not fit in memory."""


class ImbalanceError(ShardtuneError):
    """Ranks hold very different amounts of parameter memory (the sharding silently failed)."""


class Diverged(ShardtuneError):
    """Training produced non-finite losses or gradients for too many consecutive steps."""
    exit_code = 3


class Stopped(ShardtuneError):
    """A preemption signal (SIGTERM, SIGUSR1) stopped the run after a complete checkpoint; resume continues it."""
    exit_code = 75  # EX_TEMPFAIL: try again later (Slurm requeue scripts can test for it)


class OutOfMemory(ShardtuneError):
    """The GPU ran out of memory while loading or training; what was checkpointed before is kept."""
    exit_code = 5


class RankLost(ShardtuneError):
    """Another rank of a multi-process run died or stopped answering; this rank stopped too."""
    exit_code = 4
