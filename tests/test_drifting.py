"""The drifting world: real drift, arrivals and retirements where the tables say."""
import numpy as np
import pandas as pd
import pytest

from trainer.data.drifting import DAY, START, day_window, generate_drifting, trend_schedule
from trainer.data.synthetic import generate

WORLD = dict(num_users=600, num_items=300, exposures_per_user=20, days=10, seed=0,
             new_users_per_day=30, new_items_per_day=20, item_lifetime_days=8.0)


@pytest.fixture(scope="module")
def world():
    return generate_drifting(**WORLD)


def _day(ts):
    return ((np.asarray(ts) - START) // DAY).astype(int)


def _top(clicks: pd.DataFrame, k: int = 30) -> set:
    return set(clicks["item_id"].value_counts().index[:k])


def test_deterministic_under_the_seed():
    small = {**WORLD, "num_users": 100, "num_items": 80, "days": 4}
    one, again = generate_drifting(**small), generate_drifting(**small)
    for a, b in ((one.interactions, again.interactions), (one.users, again.users),
                 (one.items, again.items), (one.ranking_log, again.ranking_log)):
        pd.testing.assert_frame_equal(a, b)
    other = generate_drifting(**{**small, "seed": 1})
    assert not one.interactions.equals(other.interactions)


def test_population_and_sessions_are_as_configured(world):
    assert len(world.users) == 600 + 30 * 9 and len(world.items) == 300 + 20 * 9
    sessions = world.interactions.groupby(
        ["user_id", _day(world.interactions["timestamp"])]).size()
    assert (sessions == 20).all()          # one session of exposures_per_user a day
    assert set(world.interactions["clicked"].unique()) == {0, 1}
    assert {"category", "tags", "price", "title"} <= set(world.items.columns)
    assert {"age", "country", "favorite_genres", "device"} <= set(world.users.columns)


def test_top_items_of_day_1_and_day_9_differ(world):
    clicks = world.positives()
    day = _day(clicks["timestamp"])
    first, last = clicks[day == 1], clicks[day == 9]
    halves = (first["timestamp"].to_numpy() % 2) == 0       # two samples of the same day
    within = len(_top(first[halves]) & _top(first[~halves])) / 30
    across = len(_top(first) & _top(last)) / 30
    assert within - across >= 0.3, (within, across)


def test_trending_genres_draw_the_clicks_of_their_days(world):
    schedule = trend_schedule(WORLD["seed"], WORLD["days"])
    assert len(schedule) == 10 and all(len(day) == 2 for day in schedule)
    clicks = world.positives()
    genre = world.items.set_index("item_id").loc[clicks["item_id"], "category"].to_numpy()
    day = _day(clicks["timestamp"])
    a, b = next((a, b) for a in range(10) for b in range(a + 1, 10)
                if not set(schedule[a]) & set(schedule[b]))

    def share(d, genres):
        return np.isin(genre[day == d], genres).mean()

    assert share(a, schedule[a]) > share(b, schedule[a]) + 0.1
    assert share(b, schedule[b]) > share(a, schedule[b]) + 0.1


def test_users_and_items_arrive_on_the_days_the_tables_say(world):
    users = world.users.set_index("user_id")["available_from"]
    items = world.items.set_index("item_id")["available_from"]
    assert (_day(users) == np.r_[np.zeros(600), np.repeat(np.arange(1, 10), 30)]).all()
    assert (_day(items) == np.r_[np.zeros(300), np.repeat(np.arange(1, 10), 20)]).all()
    rows = world.interactions
    assert (rows["timestamp"].to_numpy() >= users.loc[rows["user_id"]].to_numpy()).all()
    assert (rows["timestamp"].to_numpy() >= items.loc[rows["item_id"]].to_numpy()).all()
    # a new user is active on the day they join
    first = rows.groupby("user_id")["timestamp"].min()
    new = users[_day(users) > 0]
    assert (_day(first.loc[new.index]) == _day(new)).all()
    # the items published on a day get clicked from that day on
    clicked = world.positives()
    new_items = items[_day(items) == 5].index
    assert clicked["item_id"].isin(new_items).any()
    assert not clicked[_day(clicked["timestamp"]) < 5]["item_id"].isin(new_items).any()


def test_retired_items_get_nothing_after_their_last_day(world):
    until = world.items.set_index("item_id")["available_until"]
    retired = until.dropna()
    assert 30 < len(retired) < len(until)
    assert ((retired.to_numpy(dtype=np.int64) - START) % DAY == 0).all()  # at a day's end
    rows = world.interactions.join(until, on="item_id")
    after = rows["available_until"].notna() & (rows["timestamp"] >= rows["available_until"])
    assert not after.any()
    had_clicks = world.positives()["item_id"].isin(retired.index)
    assert had_clicks.any()                                # they were live before


def test_ranking_log_is_timestamped_and_never_shown_in_its_session(world):
    log = world.ranking_log
    assert len(log) == world.interactions.groupby(
        ["user_id", _day(world.interactions["timestamp"])]).ngroups * 4
    shown = set(zip(world.interactions.user_id, _day(world.interactions.timestamp),
                    world.interactions.item_id))
    assert not shown & set(zip(log.user_id, _day(log.timestamp), log.item_id))
    items = world.items.set_index("item_id")
    live_from = items.loc[log.item_id, "available_from"].to_numpy()
    live_until = items.loc[log.item_id, "available_until"].fillna(2**62).to_numpy(dtype=np.int64)
    assert ((live_from <= log.timestamp) & (log.timestamp < live_until)).all()


def test_day_window_bounds():
    assert day_window(0) == (1_700_006_400, 1_700_006_400 + 86_400)
    assert day_window(3)[0] == day_window(2)[1]


def test_single_day_world_is_unchanged():
    """Numbers of the default generator before the drifting world was added."""
    t = generate(num_users=200, num_items=100, exposures_per_user=20, seed=3)
    i = t.interactions
    assert (len(i), int(i.timestamp.sum()), int(i.clicked.sum())) == (4000, 6803285050985, 2058)
    assert i.iloc[0].tolist() == ["u147", "i35", 1700030036, 1, 1.0]
    assert t.users.iloc[7].tolist()[::2] == ["u7", "uk", "tv"]
    assert float(t.users.age.sum()) == pytest.approx(7515.5634765625)
    assert t.items.iloc[5].tolist()[:3] == ["i5", "docs", "comedy|docs|tag21"]
    assert float(t.items.price.sum()) == pytest.approx(1507.5167236328125)
    assert t.ranking_log.iloc[3].tolist() == ["u0", "i34"]
