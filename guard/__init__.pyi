# The public names of `guard`, listed once: `guard/__init__.py` reads this file to import
# each on first use and to make `__all__`; type checkers read it as the package's interface.
from guard.errors import ConfigError as ConfigError
from guard.errors import GuardError as GuardError
from guard.errors import InputMismatch as InputMismatch
from guard.errors import RecoveryExhausted as RecoveryExhausted
from guard.errors import Unavailable as Unavailable
from guard.health import readiness as readiness
from guard.integrations.endpoints import asgi_app as asgi_app
from guard.integrations.endpoints import wsgi_app as wsgi_app
from guard.integrations.server import serve as serve
from guard.ladder import DYNAMIC as DYNAMIC
from guard.ladder import SESSION_LADDER as SESSION_LADDER
from guard.ladder import STATIC as STATIC
from guard.ladder import Policy as Policy
from guard.ladder import Rung as Rung
from guard.ladder import session_ladder as session_ladder
from guard.listeners import Listener as Listener
from guard.mnn import mnn_factory as mnn_factory
from guard.mnn import mnn_session_factory as mnn_session_factory
from guard.mnn import session_factory as session_factory
from guard.pool import Pool as Pool
from guard.recording import record as record
from guard.session import GuardedSession as GuardedSession
from guard.state import SessionStatus as SessionStatus
from guard.state import State as State
from guard.wrapping import wrap as wrap

__version__: str
__all__: list[str]
