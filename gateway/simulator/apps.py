"""The Conversation API App resource as ``GET .../apps/{app_id}`` returns it.

Only ``rate_limits`` and ``queue_stats`` vary: ``rate_limits.outbound`` is the app's
configured rate (what Sinch sold, not what its queue really drains: see
``drain_factors``) and ``queue_stats.outbound_size`` the messages waiting in its
ingress queue at the time of the request. The rest is the shape of a new app with
no channel credentials, so that clients that parse the whole resource (the official
SDK does) accept it.
"""

from __future__ import annotations

from typing import Any, Final

from gateway.simulator.settings import SimulatorSettings

INBOUND_RATE: Final = 20
WEBHOOKS_RATE: Final = 25


def reported_rate(rate: float) -> int:
    """Sinch reports whole messages per second; a fractional test rate rounds down, to 1."""
    return max(1, int(rate))


def app_resource(settings: SimulatorSettings, app_id: str, outbound_size: int) -> dict[str, Any]:
    """The App document of ``app_id`` with ``outbound_size`` messages queued."""
    mode = settings.processing_mode_of(app_id)
    return {
        "id": app_id,
        "display_name": app_id,
        "channel_credentials": [],
        "conversation_metadata_report_view": "NONE",
        "rate_limits": {
            "outbound": reported_rate(settings.app_limit(app_id)),
            "inbound": INBOUND_RATE,
            "webhooks": WEBHOOKS_RATE,
        },
        "retention_policy": {"retention_type": "MESSAGE_EXPIRE_POLICY", "ttl_days": 180},
        "dispatch_retention_policy": {"retention_type": "MESSAGE_EXPIRE_POLICY", "ttl_days": 0},
        "processing_mode": mode,
        "smart_conversation": {"enabled": False},
        "queue_stats": {"outbound_size": outbound_size, "outbound_limit": settings.queue_size},
        "callback_settings": {"secret_for_overridden_callback_urls": ""},
        "delivery_report_based_fallback": {"enabled": False, "delivery_report_waiting_time": 0},
        "message_retry_settings": {"retry_duration": 3600},
    }
