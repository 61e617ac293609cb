"""What an Open WebUI feedback item becomes (trainer/openwebui.py), on items shaped as Open WebUI
0.12's page sends them; tests/e2e/test_openwebui.py runs the whole import against a real one."""
from trainer.openwebui import _comment, _rating, _thumbs, rescale_rating, sibling_message_ids


def test_a_1_to_10_rating_is_rescaled_onto_1_to_7():
    assert [rescale_rating(v) for v in range(1, 11)] == [1, 2, 2, 3, 4, 4, 5, 6, 6, 7]
    assert _rating({"details": {"rating": 10}}) == 7
    assert _rating({"details": {"rating": 0}}) is None and _rating({"details": {"rating": 11}}) is None
    assert _rating({"details": {"rating": 5.5}}) is None and _rating({"details": {"rating": True}}) is None
    assert _rating({"rating": 1}) is None  # no detailed rating given


def test_thumbs_come_from_plus_or_minus_one_only():
    assert (_thumbs({"rating": 1}), _thumbs({"rating": "-1"}), _thumbs({"rating": 0}), _thumbs({})) == (1, -1, None, None)


def test_comment_reason_and_tags_make_one_comment():
    assert _comment({"data": {"comment": " Too long. ", "reason": "Not helpful", "tags": ["tone", "length"]}}) \
        == "Too long.\nreason: Not helpful\ntags: tone, length"
    assert _comment({"data": {"rating": 1}, "meta": {"tags": ["x"]}}) == "tags: x"
    assert _comment({"data": {"rating": 1, "comment": ""}}) is None


def test_a_side_by_side_vote_names_the_sibling_answers_of_the_voted_models():
    messages = {"u": {"childrenIds": ["a", "b", "c"]}, "a": {"parentId": "u", "model": "feedloop"},
                "b": {"parentId": "u", "model": "v1"}, "c": {"parentId": "u", "model": "other"}}
    item = {"data": {"sibling_model_ids": ["v1", "feedloop"]}, "meta": {"message_id": "a"},
            "snapshot": {"chat": {"chat": {"history": {"messages": messages}}}}}
    assert sibling_message_ids(item) == ["b"]
    assert sibling_message_ids(item | {"snapshot": None}) == []
