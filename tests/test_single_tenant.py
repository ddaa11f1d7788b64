"""Auth off: the company a request names, or the configured default company (seed 001's demo)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from pipeline.errors import RequestError
from pipeline.settings import Settings
from web.auth import Gate


def gate(**settings) -> Gate:
    return Gate(Settings(auth="off", **settings))


def test_without_a_default_company_a_request_must_name_one():
    with pytest.raises(RequestError) as refused:
        gate().caller(make_mocked_request("GET", "/api/v1/documents"))
    assert (refused.value.status, refused.value.code) == (400, "missing_company_id")


def test_a_request_naming_no_company_acts_as_the_default_company():
    caller = gate(default_company_id="default-company-uuid").caller(make_mocked_request("GET", "/api/v1/documents"))
    assert caller.company_id == "default-company-uuid"
    assert caller.key_id is None


def test_a_request_naming_a_company_keeps_it_over_the_default():
    request = make_mocked_request("GET", "/api/v1/documents", headers={"X-Company-ID": "acme"})
    assert gate(default_company_id="default-company-uuid").caller(request).company_id == "acme"


def test_keys_required_ignore_the_default_company():
    with pytest.raises(RequestError) as refused:
        Gate(Settings(auth="required", auth_secret="s" * 32, default_company_id="demo")).caller(
            make_mocked_request("GET", "/api/v1/documents")
        )
    assert refused.value.status == 401
