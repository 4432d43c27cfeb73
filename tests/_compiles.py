"""Which programs XLA compiles inside a block (from jax.log_compiles' messages)."""
import contextlib
import logging

import jax


@contextlib.contextmanager
def compiled_programs():
    """Yields a list that fills with the names (``jit(f)``) of the programs compiled inside."""
    names: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                names.append(msg[len("Compiling "):].split(" with ")[0])

    grab = Grab()
    logging.getLogger("jax").addHandler(grab)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logging.getLogger("jax").removeHandler(grab)
