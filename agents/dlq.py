"""Sending bad input to the dead-letter topic, from any agent."""

from __future__ import annotations

import logging

import faust

from streams.app import raw_topic
from streams.deadletter import dead_letter
from streams.settings import Settings

log = logging.getLogger(__name__)


class DeadLetters:
    def __init__(self, app: faust.App, settings: Settings, agent: str) -> None:
        self.topic = raw_topic(app, settings, "dlq")
        self.agent = agent
        self.count = 0

    async def send(self, message: faust.types.Message, reason: str) -> None:
        self.count += 1
        log.warning(
            "%s: dead letter from %s[%s]@%s: %s", self.agent, message.topic, message.partition, message.offset, reason
        )
        record = dead_letter(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            reason=reason,
            agent=self.agent,
        )
        await self.topic.send(key=message.key, value=record)
