import pytest
import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.language import datasets, encodings
from lm_human_preferences.utils.errors import UserError

PAD = 27


def task(**kw):
    return lm_tasks.TaskHParams(query_length=4, query_dataset="test", response_length=6, **kw)


@pytest.mark.parametrize("tokens, start, end, expected", [
    ([1, 2, 3], None, None, [1, 2, 3, PAD]),
    ([1, 2, 3, 4, 5, 6], None, None, [1, 2, 3, 4]),
    ([1, 26, 2, 3, 26, 4, 5], 26, None, [2, 3, 26, 4]),  # drop up to and including the first start token
    ([1, 2, 3], 26, None, None),  # no start token: skip the text
    ([26, 1, 26, 2, 26, 3, 3], None, 26, [26, 1, 26, PAD]),  # cut after the last end token within the query
    ([1, 2, 3, 4, 26], None, 26, None),  # the end token only beyond query_length: skip
    ([1, 2, 26], 26, None, [1, 2, 26, PAD]),  # the only start token is the last one: kept whole
    ([5, 26, 1, 26, 9, 9], 26, 26, [1, 26, PAD, PAD]),
])
def test_query_tokens(tokens, start, end, expected):
    assert datasets.query_tokens(tokens, 4, PAD, start, end) == expected


def test_query_stream_is_sharded_and_deterministic():
    enc = encodings.get("test")
    full = datasets.query_stream("test", enc, 4, start_text=".", seed=3)
    whole = [next(full) for _ in range(20)]
    ranks = [datasets.query_stream("test", enc, 4, start_text=".", seed=3, rank=r, world=2) for r in range(2)]
    shards = [[next(s) for _ in range(10)] for s in ranks]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    again = datasets.query_stream("test", enc, 4, start_text=".", seed=3)
    assert [next(again) for _ in range(20)] == whole
    other_seed = datasets.query_stream("test", enc, 4, start_text=".", seed=4)
    assert [next(other_seed) for _ in range(20)] != whole


def test_query_batches_shape_and_errors():
    batches = lm_tasks.query_batches(task(), encodings.get("test"), 5)
    batch = next(batches)
    assert batch.shape == (5, 4) and batch.dtype == torch.long
    with pytest.raises(UserError, match="start_text 'ab' must encode to exactly one token"):
        next(lm_tasks.query_batches(task(start_text="ab"), encodings.get("test"), 5))
    with pytest.raises(UserError, match="unknown query dataset 'books2'"):
        next(lm_tasks.query_batches(lm_tasks.TaskHParams(query_length=4, query_dataset="books2", response_length=2),
                                    encodings.get("test"), 5))


def test_query_formatter_adds_prefix_and_suffix():
    enc = encodings.get("test")
    fmt = lm_tasks.query_formatter(task(query_prefix="ab", query_suffix="z."), enc)
    out = fmt(torch.tensor([[5, 6, PAD, PAD]]))
    assert out.tolist() == [[0, 1, 5, 6, PAD, PAD, 25, 26]]


def test_truncation_and_penalty_cases():
    t = task(truncate_token=26, truncate_after=2)
    responses = torch.tensor([
        [1, 2, 3, 4, 5, 6],      # no truncate token
        [26, 26, 3, 4, 5, 6],    # the token only before truncate_after
        [1, 2, 26, 4, 26, 6],    # two tokens at/after truncate_after: cut after the first
        [1, 2, 3, 4, 5, 26],     # the token at the last index
        [26, 1, 3, 26, 5, 6],    # one before, one after
    ])
    post = lm_tasks.postprocess_responses(t, responses, PAD)
    assert post.tolist() == [
        [1, 2, 3, 4, 5, 6],
        [26, 26, 3, 4, 5, 6],
        [1, 2, 26, PAD, PAD, PAD],
        [1, 2, 3, 4, 5, 26],
        [26, 1, 3, 26, PAD, PAD],
    ]
    assert lm_tasks.has_truncate_token(t, responses).tolist() == [False, False, True, True, True]
    untruncated = task()
    assert torch.equal(lm_tasks.postprocess_responses(untruncated, responses, PAD), responses)
    assert lm_tasks.has_truncate_token(untruncated, responses).all()


def test_task_validation():
    with pytest.raises(UserError, match="query_length must be set"):
        lm_tasks.TaskHParams().validate()
    bad = task()
    bad.policy.initial_model = "test"
    bad.policy.temperature = 0.0
    with pytest.raises(UserError, match="temperature must be positive"):
        bad.validate()
