"""load_config: embedded defaults < TOML file < environment < flags, and errors that say which key and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfyd.config import ConfigError, load_config

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "comfyd.toml"


def write(tmp_path: Path, text: str, name: str = "comfyd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- embedded defaults ---------------------------------------------------------------------------------------
def test_embedded_defaults() -> None:
    config = load_config(None, env={"STATE_DIRECTORY": "/var/lib/comfyd"})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 9090
    assert [(b.name, b.url, b.pool, b.gpu) for b in config.backends] == [
        ("gpu0", "http://127.0.0.1:8188", "local", 0)]
    assert config.auth.api_keys == []
    assert not config.auth_required
    assert config.data_dir == Path("/var/lib/comfyd")
    assert config.db_path == Path("/var/lib/comfyd/comfyd.db")
    assert config.outputs_dir == Path("/var/lib/comfyd/outputs")
    assert config.models_dir is None
    assert config.database.synchronous == "NORMAL"
    assert config.pools == {"local"}


def test_data_dir_from_state_directory_takes_its_first_entry() -> None:
    config = load_config(None, env={"STATE_DIRECTORY": "/var/lib/comfyd:/var/lib/other",
                                    "XDG_STATE_HOME": "/home/u/.state"})
    assert config.data_dir == Path("/var/lib/comfyd")


def test_data_dir_from_xdg_state_home() -> None:
    config = load_config(None, env={"XDG_STATE_HOME": "/home/u/.state"})
    assert config.data_dir == Path("/home/u/.state/comfyd")


def test_data_dir_falls_back_to_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, env={})
    assert config.data_dir == tmp_path / ".local" / "state" / "comfyd"


def test_the_process_environment_is_used_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYD_CONFIG", raising=False)
    monkeypatch.delenv("COMFYUI_API_URL", raising=False)
    monkeypatch.setenv("COMFYD_PORT", "9191")
    monkeypatch.setenv("STATE_DIRECTORY", "/srv/state")
    config = load_config(None)
    assert config.server.port == 9191
    assert config.data_dir == Path("/srv/state")


# -- the TOML file -------------------------------------------------------------------------------------------
def test_the_shipped_config_file_loads() -> None:
    config = load_config(REPO_CONFIG, env={"STATE_DIRECTORY": "/var/lib/comfyd"})
    assert config.server.port == 9090
    assert config.server.host == "127.0.0.1"
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert [(b.name, b.url, b.pool, b.gpu, b.prefetch) for b in config.backends] == [
        ("gpu0", "http://127.0.0.1:8188", "local", 0, 1)]
    assert config.scheduler.aging_seconds == 600
    assert config.logging.format == "auto"
    assert config.data_dir == Path("/var/lib/comfyd")


def test_the_config_path_may_come_from_comfyd_config() -> None:
    config = load_config(None, env={"COMFYD_CONFIG": str(REPO_CONFIG), "STATE_DIRECTORY": "/x"})
    assert config.backends[0].name == "gpu0"


def test_a_custom_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
host = "0.0.0.0"
port = 8080
max_body_bytes = 1024

[auth]
api_keys = ["alpha", "beta"]

[paths]
data_dir = "/srv/comfyd"
outputs = "/srv/comfyui/output"
models = "/srv/comfyui/models"

[database]
synchronous = "FULL"

[scheduler]
aging_seconds = 30
max_attempts = 3

[[backends]]
url = "http://10.0.0.5:8188/"
name = "big"
gpu = 3

[[backends]]
url = "https://pool.salad.cloud"
pool = "salad"
shared_outputs = false

[[backends]]
url = "http://10.0.0.6:8188"
""")
    config = load_config(path, env={})
    assert (config.server.host, config.server.port, config.server.max_body_bytes) == ("0.0.0.0", 8080, 1024)
    assert config.auth.api_keys == ["alpha", "beta"]
    assert config.data_dir == Path("/srv/comfyd")
    assert config.db_path == Path("/srv/comfyd/comfyd.db")
    assert config.outputs_dir == Path("/srv/comfyui/output")
    assert config.models_dir == Path("/srv/comfyui/models")
    assert config.database.synchronous == "FULL"
    assert (config.scheduler.aging_seconds, config.scheduler.max_attempts) == (30, 3)
    assert [(b.name, b.url, b.pool, b.gpu, b.shared_outputs) for b in config.backends] == [
        ("big", "http://10.0.0.5:8188", "local", 3, True),  # trailing slash stripped
        ("salad-1", "https://pool.salad.cloud", "salad", None, False),
        ("gpu2", "http://10.0.0.6:8188", "local", 2, True),
    ]
    assert config.pools == {"local", "salad"}


# -- environment ---------------------------------------------------------------------------------------------
def test_comfyui_api_url_with_two_urls_makes_two_backends() -> None:
    config = load_config(None, env={"COMFYUI_API_URL": "http://127.0.0.1:8188, http://127.0.0.1:8189/",
                                    "STATE_DIRECTORY": "/x"})
    assert [(b.name, b.url, b.gpu, b.pool) for b in config.backends] == [
        ("gpu0", "http://127.0.0.1:8188", 0, "local"),
        ("gpu1", "http://127.0.0.1:8189", 1, "local"),
    ]


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
port = 8080
[paths]
data_dir = "/from/file"
[auth]
api_keys = ["file-key"]
[[backends]]
url = "http://127.0.0.1:7000"
name = "from-file"
""")
    config = load_config(path, env={
        "COMFYUI_API_URL": "http://127.0.0.1:8188,http://127.0.0.1:8189",
        "MANAGEMENT_API_KEY": " key1, key2 ,,",
        "COMFYD_HOST": "0.0.0.0",
        "COMFYD_PORT": "9999",
        "COMFYD_DATA_DIR": "/from/env",
        "COMFYUI_OUTPUTS": "/comfy/output",
        "COMFYUI_MODELS": "/comfy/models",
        "COMFYD_DATABASE": "/db/comfyd.sqlite",
        "COMFYD_SYNCHRONOUS": "full",
        "COMFYD_LOG_LEVEL": "debug",
        "COMFYD_LOG_FORMAT": "json",
        "COMFYD_DRAIN_SECONDS": "12.5",
    })
    assert [b.name for b in config.backends] == ["gpu0", "gpu1"]
    assert config.auth.api_keys == ["key1", "key2"]
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9999
    assert config.data_dir == Path("/from/env")
    assert config.outputs_dir == Path("/comfy/output")
    assert config.models_dir == Path("/comfy/models")
    assert config.db_path == Path("/db/comfyd.sqlite")
    assert config.database.synchronous == "FULL"
    assert (config.logging.level, config.logging.format) == ("debug", "json")
    assert config.server.drain_seconds == 12.5


def test_flags_override_the_environment(tmp_path: Path) -> None:
    config = load_config(None, env={"COMFYD_HOST": "0.0.0.0", "COMFYD_PORT": "9999", "MANAGEMENT_API_KEY": "k",
                                    "COMFYD_DATA_DIR": "/from/env"},
                         overrides={"host": "127.0.0.2", "port": 7777, "data_dir": str(tmp_path)})
    assert config.server.host == "127.0.0.2"
    assert config.server.port == 7777
    assert config.data_dir == tmp_path


def test_flags_left_unset_do_not_override() -> None:
    config = load_config(None, env={"COMFYD_PORT": "9999", "STATE_DIRECTORY": "/x"},
                         overrides={"host": None, "port": None, "data_dir": None})
    assert config.server.port == 9999
    assert config.data_dir == Path("/x")


# -- errors --------------------------------------------------------------------------------------------------
def test_an_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9090\ncolour = \"blue\"\n")
    with pytest.raises(ConfigError, match="colour") as error:
        load_config(path, env={})
    assert str(path) in str(error.value)
    assert "server" in str(error.value)


def test_an_unknown_section_in_the_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[sever]\nport = 9090\n")
    with pytest.raises(ConfigError, match="sever"):
        load_config(path, env={})


def test_a_value_of_the_wrong_type_names_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = \"ninety\"\n")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(path, env={})


def test_bad_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 9090\n")
    with pytest.raises(ConfigError, match="not valid TOML") as error:
        load_config(path, env={})
    assert str(path) in str(error.value)


def test_a_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config file /no/such/comfyd.toml"):
        load_config("/no/such/comfyd.toml", env={})


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_a_bad_port_in_the_file(tmp_path: Path, port: int) -> None:
    path = write(tmp_path, f"[server]\nport = {port}\n")
    with pytest.raises(ConfigError, match=r"server\.port must be 1-65535"):
        load_config(path, env={"STATE_DIRECTORY": "/x"})


@pytest.mark.parametrize("port", ["http", "90 90", "", "70000"])
def test_a_bad_port_in_the_environment(port: str) -> None:
    env = {"STATE_DIRECTORY": "/x", "COMFYD_PORT": port}
    if port == "":
        assert load_config(None, env=env).server.port == 9090  # empty means unset
        return
    with pytest.raises(ConfigError, match="port"):
        load_config(None, env=env)


def test_a_bad_port_flag() -> None:
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(None, env={"STATE_DIRECTORY": "/x"}, overrides={"port": 70000})


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8188", "127.0.0.1:8188", "ws://127.0.0.1:8188", "file:///x"])
def test_a_backend_url_that_is_not_http(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'[[backends]]\nurl = "{url}"\nname = "odd"\n')
    with pytest.raises(ConfigError, match="backend odd: url must start with http:// or https://"):
        load_config(path, env={"STATE_DIRECTORY": "/x"})


def test_a_backend_url_from_the_environment_that_is_not_http() -> None:
    with pytest.raises(ConfigError, match="gpu1: url must start with http"):
        load_config(None, env={"STATE_DIRECTORY": "/x",
                               "COMFYUI_API_URL": "http://127.0.0.1:8188,127.0.0.1:8189"})


def test_a_backend_without_url(tmp_path: Path) -> None:
    path = write(tmp_path, '[[backends]]\nname = "gpu0"\n')
    with pytest.raises(ConfigError, match="url"):
        load_config(path, env={})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com"])
def test_a_non_loopback_host_without_an_api_key_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match=f"refusing to serve on {host} without an API key"):
        load_config(None, env={"STATE_DIRECTORY": "/x", "COMFYD_HOST": host})
    config = load_config(None, env={"STATE_DIRECTORY": "/x", "COMFYD_HOST": host, "MANAGEMENT_API_KEY": "k"})
    assert config.server.host == host and config.auth_required


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_hosts_need_no_key(host: str) -> None:
    assert load_config(None, env={"STATE_DIRECTORY": "/x", "COMFYD_HOST": host}).server.host == host


def test_a_non_loopback_host_flag_without_an_api_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0"):
        load_config(None, env={"STATE_DIRECTORY": "/x"}, overrides={"host": "0.0.0.0"})


def test_duplicate_backend_names(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[backends]]
url = "http://127.0.0.1:8188"
name = "gpu0"
[[backends]]
url = "http://127.0.0.1:8189"
name = "gpu0"
""")
    with pytest.raises(ConfigError, match="name 'gpu0' is used twice"):
        load_config(path, env={"STATE_DIRECTORY": "/x"})


def test_a_given_name_clashing_with_a_generated_one(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[backends]]
url = "http://127.0.0.1:8188"
name = "gpu1"
[[backends]]
url = "http://127.0.0.1:8189"
""")
    with pytest.raises(ConfigError, match="'gpu1' is used twice"):
        load_config(path, env={"STATE_DIRECTORY": "/x"})


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("COMFYD_SYNCHRONOUS", "sometimes", "database.synchronous"),
    ("COMFYD_LOG_FORMAT", "xml", "logging.format"),
    ("COMFYD_DRAIN_SECONDS", "soon", "COMFYD_DRAIN_SECONDS"),
])
def test_bad_environment_values_are_config_errors(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, env={"STATE_DIRECTORY": "/x", variable: value})


def test_an_unknown_override() -> None:
    with pytest.raises(ConfigError, match="unknown override colour"):
        load_config(None, env={"STATE_DIRECTORY": "/x"}, overrides={"colour": "blue"})


def test_a_negative_progress_interval_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[scheduler]\nprogress_interval = -0.5\n")
    with pytest.raises(ConfigError, match=r"scheduler\.progress_interval must be 0 or more seconds"):
        load_config(path, env={"STATE_DIRECTORY": "/x"})
    assert load_config(write(tmp_path, "[scheduler]\nprogress_interval = 0\n"),
                       env={"STATE_DIRECTORY": "/x"}).scheduler.progress_interval == 0
